"""MOS against references written from the official code (sun-hailong/AAAI25-MOS
``models/mos.py``, ``backbone/vit_mos.py``, ``exps/``): adapter merging, the orthogonality term,
the optimiser groups, the classifier alignment, the self-refined retrieval and the ensembled
logits, the recipes; old adapters frozen, statistics equal to a direct computation, no task label
at test time; resume, bf16, and (slow) the CLI on digits and a killed run resumed."""
import pytest
import torch
from torch.nn import functional as F

from clbench.methods.prototype import mos
from clbench.methods.prototype.mos import MOS, retrieve
from task_adapter_checks import (check_bf16_run, check_prediction_ignores_task_labels,
                                 check_resume_continues_identically, official_classifier_align,
                                 train_recording)
from helpers import (Killed, build, digits_results, images_of, kill_after_task, tensor_stream,
                     tiny_vit)

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(epochs=2, lr=0.05, batch_size=4, ffn_num=4, ca_epochs=2, ca_samples=20)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return train_recording(MOS, mos, tasks=3, **SMALL)


# ----------------------------------------------------------------- references (official math)
def official_reweight(weights, adapters_before, momentum):
    """``reweight_adapter``: the prefix sum of the stored adapters (sum_adapter_param) and
    (1 − m)·w + m·sum/idx."""
    prefix = adapters_before[0]
    for adapter in adapters_before[1:]:
        prefix = adapter + prefix
    idx = len(adapters_before)
    return (1 - momentum) * weights + momentum * prefix / idx


def official_orth_loss(class_means, features, reg):
    rows = torch.cat([class_means, features], dim=0) if len(class_means) else features
    sim = torch.matmul(rows, rows.t()) / 0.8
    return reg * F.cross_entropy(sim, torch.arange(0, sim.shape[0]).long())


def official_eval(orig_logits, all_features, head, cls2task, cur_task, ensemble=True):
    """``_eval_cnn``: per image, the self-refined loop (MAX_ITER = 4), then the ensemble."""
    orig_preds = orig_logits.argmax(1)
    final, visited = [], []  # visited: the adapters each image went through
    for x_id in range(len(orig_logits)):
        loop_num, prev = 0, cls2task[int(orig_preds[x_id])]
        path = [prev]
        while True:
            loop_num += 1
            cur_logits = head(all_features[x_id, prev].unsqueeze(0))
            cur = cls2task[int(cur_logits.argmax(1))]
            if loop_num >= 4 or cur == prev:
                break
            prev = cur
            path.append(prev)
        final.append(cur_logits)
        visited.append(path)
    final = torch.cat(final)
    if ensemble:
        return F.softmax(final, 1) + F.softmax(orig_logits / (1 / (cur_task + 1)), 1), visited
    return final, visited


# ----------------------------------------------------------------- parity
def test_merge_after_a_step_is_the_official_reweighting(trained):
    _, strategy, _, _ = trained
    m = strategy.config.adapter_momentum
    before = [p.clone() for p in strategy.task_adapter_parameters(2)]
    earlier = [strategy.task_adapter_parameters(k) for k in range(2)]
    strategy.merge_adapter()
    after = strategy.task_adapter_parameters(2)
    for i, (w, new) in enumerate(zip(before, after)):
        assert torch.equal(new, official_reweight(w, [e[i] for e in earlier], m))
    with torch.no_grad():
        for p, w in zip(after, before):
            p.copy_(w)


def test_merge_runs_once_after_every_optimiser_step_from_the_second_task(monkeypatch):
    calls, steps = [], []
    real_merge, real_step = MOS.merge_adapter, torch.optim.SGD.step
    monkeypatch.setattr(MOS, "merge_adapter",
                        lambda self: calls.append(self.task) or real_merge(self))
    monkeypatch.setattr(torch.optim.SGD, "step",
                        lambda self, *a, **k: steps.append(len(calls)) or real_step(self, *a, **k))
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    strategy = build(MOS, tiny_vit(), n_tasks=2, **{**SMALL, "ca_epochs": 0})
    strategy.train(stream.train[0])
    first = len(calls)
    start = [p.clone() for p in strategy.task_adapter_parameters(0)]
    strategy.train(stream.train[1])
    assert first > 0 and len(calls) == len(steps)  # one merge right after each step
    assert calls.count(1) == len(calls) - first
    # a task's adapter goes on from the previous one and is pulled towards it
    moved = [(p - s).abs().sum() for p, s in zip(strategy.task_adapter_parameters(1), start)]
    assert any(v > 0 for v in moved)


def test_orthogonality_term_is_the_official_one(trained):
    _, strategy, _, _ = trained
    strategy._features = torch.randn(5, tiny_vit().num_features) * 3
    expected = official_orth_loss(strategy.gaussians.means.float(), strategy._features,
                                  strategy.config.reg)
    torch.testing.assert_close(strategy.extra_loss(), expected, rtol=1e-5, atol=1e-6)


def test_optimiser_groups_are_the_official_ones(trained):
    """``get_optimizer``: adapter at lr, head at lr × 0.1, both with the weight decay; SGD 0.9."""
    _, strategy, _, _ = trained
    optimizer = strategy.make_optimizer_for_task(strategy.trainable_parameters())
    adapter, head = optimizer.param_groups
    assert list(map(id, adapter["params"])) == list(map(id, strategy.task_adapter_parameters(2)))
    assert list(map(id, head["params"])) == list(map(id, strategy.model.head.parameters()))
    assert (adapter["lr"], head["lr"]) == (0.05, pytest.approx(0.005))
    assert {g["weight_decay"] for g in (adapter, head)} == {strategy.config.weight_decay}
    assert isinstance(optimizer, torch.optim.SGD) and adapter["momentum"] == 0.9


def test_alignment_is_the_official_classifer_align(trained):
    """From the second task on, the linear head is realigned exactly as ``classifer_align`` does
    it on the same Gaussians and random draws (means unshrunk, T_max = the alignment epochs)."""
    _, strategy, _, alignments = trained
    assert [call["task"] for call in alignments] == [1, 2]
    cfg = strategy.config
    assert cfg.ca_samples == 5 * cfg.batch_size  # the codes' batch_size * 5
    for call in alignments:
        head = call["before"]
        torch.set_rng_state(call["rng"])
        official_classifier_align(head, [head.fc.weight, head.fc.bias], call["means"],
                                  call["covs"], cfg.batch_size, cfg.ca_lr, cfg.ca_epochs,
                                  cfg.weight_decay, t_max=cfg.ca_epochs)
        for name, value in call["after"].state_dict().items():
            torch.testing.assert_close(value, head.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_diagonal_storage_keeps_the_variances(trained):
    """``ca_storage_efficient_method="variance"`` (ImageNet-A): diag(cov + 1e-4·I)."""
    _, strategy, _, _ = trained
    features = torch.randn(10, tiny_vit().num_features, dtype=torch.float64)
    labels = torch.tensor(list(strategy.new_classes)).repeat(5)
    saved, covs = (strategy.gaussians, strategy.config.ca_covariance), []
    try:
        for storage in ("full", "diagonal"):
            strategy.config.ca_covariance = storage
            strategy.gaussians = strategy.make_gaussians(features.shape[1])
            strategy.add_gaussians(features, labels, 2)
            covs.append(strategy.gaussians.covs)
    finally:
        strategy.gaussians, strategy.config.ca_covariance = saved
    assert all(torch.equal(b, torch.diag(torch.diagonal(a))) for a, b in zip(*covs))
    assert not torch.equal(covs[0], covs[1])


# exps/mos_{cifar,inr,ina,cub}.json: tuned_epoch, init_lr, batch_size, weight_decay, storage
OFFICIAL_RECIPES = {"cifar100": (20, 0.03, 48, 5e-4, "covariance"),
                    "imagenet-r": (10, 0.05, 16, 5e-3, "covariance"),
                    "imagenet-a": (10, 0.05, 32, 5e-3, "variance"),
                    "cub200": (10, 0.01, 32, 5e-4, "covariance")}


@pytest.mark.parametrize("benchmark", sorted(OFFICIAL_RECIPES))
def test_recipe_is_the_official_config(benchmark):
    epochs, lr, batch, decay, storage = OFFICIAL_RECIPES[benchmark]
    cfg = MOS.Config(**MOS.defaults_for(benchmark, 10))
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.weight_decay) == (epochs, lr, batch, decay)
    assert cfg.ca_covariance == {"covariance": "full", "variance": "diagonal"}[storage]
    assert (cfg.min_lr, cfg.reg, cfg.adapter_momentum, cfg.ensemble, cfg.ffn_num) == (
        0.0, 0.1, 0.1, True, 16)
    assert (cfg.ca_epochs, cfg.ca_lr, cfg.ca_samples, cfg.ca_weight_decay) == (
        30, 0.005, 5 * batch, decay)  # batch_size * 5 draws, the group's weight decay


def test_retrieval_picks_the_official_adapter():
    g = torch.Generator().manual_seed(3)
    tasks, n, d, per_task = 4, 64, 8, 3
    features = torch.randn(tasks, n, d, generator=g)
    head = torch.nn.Linear(d, tasks * per_task)
    task_of = torch.arange(tasks).repeat_interleave(per_task)
    first = torch.randn(n, tasks * per_task, generator=g)
    with torch.no_grad():
        ours, adapter = retrieve(features, first, head, task_of, 4)
        ref, visited = official_eval(first, features.transpose(0, 1), head, task_of.tolist(), 3,
                                     ensemble=False)
    assert adapter.tolist() == [path[-1] for path in visited]  # the same adapter wins
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)  # a row alone vs in a batch
    lengths = {len(p) for p in visited}
    assert 1 in lengths and max(lengths) >= 3  # stays put for some, wanders for others


def test_prediction_statistics_and_ensemble_follow_the_official_code(trained):
    stream, strategy, _, _ = trained
    strategy.model.eval()
    with torch.no_grad():
        protos, gaussians, calls = [], strategy.gaussians, []
        for task in range(3):  # statistics against a direct computation
            x, y = images_of(stream.train[task].dataset)
            own = strategy.adapter_features(x, task).double()
            first = strategy.adapter_features(x, 0).double()
            for c in y.unique().tolist():
                torch.testing.assert_close(gaussians.means[c], own[y == c].mean(0))
                cov = torch.cov(own[y == c].T) + 1e-4 * torch.eye(own.shape[1], dtype=torch.float64)
                torch.testing.assert_close(gaussians.covs[c], cov.float(), rtol=1e-4, atol=1e-5)
                protos.append(first[y == c].mean(0))
        x = torch.cat([images_of(stream.test[t].dataset)[0] for t in range(3)])
        feats = torch.stack([strategy.adapter_features(x, t) for t in range(3)], 1)
        orig = F.normalize(feats[:, 0], dim=1) @ F.normalize(torch.stack(protos).float(), dim=1).T
        expected, _ = official_eval(orig, feats, strategy.model.head, gaussians.class_task, 2)
        hook = strategy.model.backbone.patch_embed.register_forward_hook(lambda *a: calls.append(1))
        torch.testing.assert_close(strategy.predict(x), expected, rtol=1e-5, atol=1e-6)
    hook.remove()
    assert strategy.forward_passes_per_image == len(calls) == 3  # the passes predict runs


def test_old_adapters_frozen_bit_identical_new_adapter_starts_from_the_last(trained):
    _, strategy, snapshots, _ = trained
    for task, snapshot in enumerate(snapshots):
        now = strategy.task_adapter_parameters(task)
        assert all(torch.equal(a, b) for a, b in zip(snapshot, now))
        assert not any(p.requires_grad for p in now)
    start = []
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    strategy = build(MOS, tiny_vit(), n_tasks=2, **{**SMALL, "epochs": 1})
    real = strategy.before_task
    strategy.before_task = lambda task: real(task) or start.append(
        [p.clone() for p in strategy.task_adapter_parameters(task)])
    for task in range(2):
        strategy.train(stream.train[task])
    assert all(torch.equal(a, b) for a, b in zip(start[1], strategy.task_adapter_parameters(0)))


def test_prediction_sees_only_images_no_task_label(trained):
    check_prediction_ignores_task_labels(trained[1], trained[0])


def test_resume_continues_identically():
    first, second = check_resume_continues_identically(MOS, **{**SMALL, "epochs": 1})
    assert torch.equal(first.gaussians.covs, second.gaussians.covs)


def test_a_run_under_bf16_autocast_trains_aligns_and_predicts():
    check_bf16_run(MOS, **SMALL)


# ----------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
def test_cli_on_digits_at_least_as_accurate_as_linear_probe_and_resume_identical(tmp_path,
                                                                               monkeypatch):
    """MOS and TUNA end to end on digits (shipped trunk, 1 epoch, 3 alignment epochs): final
    accuracy at least the linear probe's, cost recorded; a run killed after task 2 and resumed
    gives the same counts, method facts and checkpoint tensors (both methods, one plan)."""
    from clbench import runner
    from clbench.plan import RunPlan

    cut = ["mos.ca_epochs=3", "tuna.ca_epochs=3"]
    plan = lambda name, jobs: RunPlan(run_dir=str(tmp_path / name), methods=jobs,  # noqa: E731
                                      epochs=1, overrides=cut)
    runner.run(plan("full", ["mos", "tuna", "linear-probe"]), log=lambda *_: None)
    probe = digits_results(tmp_path / "full", "linear-probe")["metrics"]["final_acc"]
    for method, passes in (("mos", 5), ("tuna", 6)):
        results = digits_results(tmp_path / "full", method)
        assert results["metrics"]["final_acc"] >= probe, (method, results["metrics"], probe)
        assert results["forward_passes_per_image"] == passes
    logs = []
    killed = kill_after_task(monkeypatch)  # each job once, right after its task 2 is saved
    with pytest.raises(Killed):  # killed in mos
        runner.run(plan("resumed", ["mos", "tuna"]), log=lambda *_: None)
    with pytest.raises(Killed):  # mos resumes and completes, then killed in tuna
        runner.run(plan("resumed", ["mos", "tuna"]), log=logs.append)
    runner.run(plan("resumed", ["mos", "tuna"]), log=logs.append)
    assert len(killed) == 2 and sum("resuming after task 2" in line for line in logs) == 2, logs
    for method in ("mos", "tuna"):
        full = digits_results(tmp_path / "full", method)
        resumed = digits_results(tmp_path / "resumed", method)
        assert resumed["complete"] and resumed["correct"] == full["correct"], method
        assert resumed["method_info"] == full["method_info"]
        ckpt = [torch.load(next((tmp_path / d).rglob(f"{method}/seed-*/checkpoint.pt")),
                           weights_only=True) for d in ("full", "resumed")]
        for key, value in ckpt[0]["model"].items():
            assert torch.equal(value, ckpt[1]["model"][key]), (method, key)


def test_the_codes_merge_before_every_block_on_request():
    """``merge_in_forward``: as the code's ``forward_features``, block b runs the adapter merged
    b + 1 times and the adapter is left merged once per block (stored ones too, at inference)."""
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    strategy = build(MOS, tiny_vit(), n_tasks=2, **{**SMALL, "epochs": 1, "merge_in_forward": True,
                                                    "adapter_momentum": 0.3})
    for task in range(2):
        strategy.train(stream.train[task])
    strategy.model.eval()
    x = images_of(stream.test[0].dataset)[0]
    start = [p.clone() for p in strategy.task_adapter_parameters(1)]
    total = strategy._prefix[0]
    merged = [(1 - 0.3) * p + 0.3 * s / 1 for p, s in zip(start, total)]
    twice = [(1 - 0.3) * p + 0.3 * s / 1 for p, s in zip(merged, total)]
    with torch.no_grad():
        out = strategy.adapter_features(x, 1)
        after = [p.clone() for p in strategy.task_adapter_parameters(1)]
        assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(after, twice))  # depth 2
        strategy.config.merge_in_forward = False  # the hooks read the flag at each call
        per_block = len(start) // 2  # block 0 ran after one merge, block 1 after two
        values = merged[:per_block] + twice[per_block:]
        for p, value in zip(strategy.task_adapter_parameters(1), values):
            p.copy_(value)
        expected = strategy.adapter_features(x, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
