"""EASE: one adapter set per task, old adapters bit-identical, real prototypes are class means in
every subspace, the complement is the paper's similarity-weighted combination, reweighted logits."""
import torch

from clbench.methods.prototype import parallel_adapter
from clbench.methods.prototype.ease import EASE
from helpers import build, tensor_stream, tiny_vit


def train_three_tasks(**config):
    stream = tensor_stream(n_classes=6, n_tasks=3, train_per_class=5)
    strategy = build(EASE, tiny_vit(), n_tasks=3, epochs=2, lr=0.05, batch_size=4, ffn_num=4, **config)
    snapshots = []
    for task in range(3):
        strategy.train(stream.train[task])
        assert len(strategy.adapters[0].adapters) == task + 1  # one new adapter set per task
        expected = sum(p.numel() for p in parallel_adapter.adapter_parameters(strategy.adapters, task))
        assert strategy.trainable_parameter_count() == expected + 2 * tiny_vit().num_features + 1
        assert strategy.forward_passes_per_image == task + 1 + int(config.get("use_init_ptm", False))
        snapshots.append([p.clone() for p in parallel_adapter.adapter_parameters(strategy.adapters, task)])
    return stream, strategy, snapshots


def official_complement(real, ranges):
    """CVPR24-Ease ``solve_sim_reset`` (use_init_ptm=False) with its explicit loops."""
    protos = real.clone()
    total = ranges[-1][1]
    for task_id in range(len(ranges) - 1):
        for dim_id in range(task_id + 1, len(ranges)):
            start_old = ranges[dim_id][0]
            a = protos[start_old:total, task_id]
            b = protos[start_old:total, dim_id]
            a_hat = protos[ranges[task_id][0]:ranges[task_id][1], task_id]
            sim = torch.zeros(len(a_hat), len(a), dtype=real.dtype)
            for i in range(len(a_hat)):
                for j in range(len(a)):
                    sim[i][j] = torch.cosine_similarity(a_hat[i], a[j], dim=0)
            sim = torch.softmax(sim, dim=1)
            b_hat = torch.zeros(len(a_hat), b.shape[1], dtype=real.dtype)
            for i in range(len(a_hat)):
                for j in range(len(a)):
                    b_hat[i] += sim[i][j] * b[j]
            protos[ranges[task_id][0]:ranges[task_id][1], dim_id] = b_hat
    return protos


def test_new_adapter_per_task_old_ones_bit_identical_and_trained():
    _, strategy, snapshots = train_three_tasks()
    for task, snapshot in enumerate(snapshots):
        now = parallel_adapter.adapter_parameters(strategy.adapters, task)
        assert all(torch.equal(a, b) for a, b in zip(snapshot, now))
        assert any(p.abs().sum() > 0 for p in now[2:4])  # up-projection left its zero init
        assert not any(p.requires_grad for p in now)


def test_real_prototypes_are_class_means_and_complement_is_similarity_weighted():
    stream, strategy, _ = train_three_tasks()
    strategy.model.eval()
    real = strategy.real_prototypes()
    for task in range(3):
        data = stream.train[task].dataset
        x = torch.stack([data[i][0] for i in range(len(data))])
        y = torch.tensor([data[i][1] for i in range(len(data))])
        for s in range(task + 1):
            with torch.no_grad():
                f = strategy.subspace_features(x, s).double()
            for c in y.unique().tolist():
                assert torch.allclose(real[c, s], f[y == c].mean(0), atol=1e-5)
    protos = strategy.prototypes()
    assert torch.allclose(protos, official_complement(real, strategy.task_ranges), atol=1e-10)
    assert protos[0:2, 1].abs().sum() > 0 and torch.equal(protos[4:6], real[4:6])


def test_logits_follow_the_official_reweighting():
    stream, strategy, _ = train_three_tasks()
    strategy.model.eval()
    x = torch.stack([stream.test[t].dataset[i][0] for t in range(3) for i in range(2)])
    with torch.no_grad():
        logits = strategy.predict(x)
        feats = [strategy.subspace_features(x, s) for s in range(3)]
    protos = strategy.prototypes().float()
    alpha, t = strategy.config.alpha, 2
    expected = torch.zeros(len(x), 6)
    for i, (start, stop) in enumerate(strategy.task_ranges):
        for j in range(3):
            cos = torch.nn.functional.normalize(feats[j], dim=1) @ \
                torch.nn.functional.normalize(protos[start:stop, j], dim=1).T
            expected[:, start:stop] += cos if j == i else alpha * cos / t
    assert torch.allclose(logits, expected, atol=1e-5)


def test_pretrained_subspace_and_resume():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    kwargs = dict(n_tasks=2, epochs=1, batch_size=4, ffn_num=4, use_init_ptm=True, beta=1.0)
    first = build(EASE, tiny_vit(), **kwargs)
    first.train(stream.train[0])
    second = build(EASE, tiny_vit(), **kwargs)
    second.load_checkpoint(first.checkpoint())
    assert torch.equal(first.prototypes(), second.prototypes())
    assert second.forward_passes_per_image == 2
