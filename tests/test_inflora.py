"""InfLoRA: designed down-projections, DualGPM memory, interference, gradients, merged inference."""
from __future__ import annotations

import pytest
import torch
from helpers import build, tiny_vit
from torch.nn import functional as F

from clbench.adapters import merged
from clbench.alignment import align_classifier
from clbench.context import RunContext
from clbench.errors import UsageError
from clbench.methods.lora import subspace
from clbench.methods.lora.inflora import InfLoRA, InfLoRAAdapter, InfLoRACA

DIM = 48


@pytest.fixture(scope="module")
def stream():
    from clbench.registry import BENCHMARKS
    from clbench.streams import build_stream

    bench_cls = BENCHMARKS.get("digits")
    bench = bench_cls(bench_cls.Config())
    return build_stream(bench.load(16), bench.class_order(1993), 5)


class Recording(InfLoRA):
    """InfLoRA that snapshots its adapters at the task boundaries, for the tests below."""

    def before_task(self, task):
        self.snap_before = [a.old_delta.clone() for a in self.adapters]
        self.bases_at_design = [(m.basis.clone(), m.retain) for m in self.memories]
        super().before_task(task)
        fc = self.model.head.fc
        self.new_head = (fc.weight[self.known_classes:].clone(), fc.bias[self.known_classes:].clone())
        self.designed = [a.down.clone() for a in self.adapters]
        self.probe_after_design = self.model_features(self.probe)

    def after_task(self, task):
        self.trained_old_delta = [a.old_delta.clone() for a in self.adapters]
        self.trained_down = [a.down.clone() for a in self.adapters]
        super().after_task(task)

    def model_features(self, x):
        return features_of(self, x)


@torch.no_grad()
def features_of(strategy, x):
    strategy.model.eval()
    with merged(strategy.model):  # evaluation runs merged (the core merges there)
        out = strategy.model.features(x)
    strategy.model.train()
    return out


def make(stream_, cls=Recording, **overrides):
    config = {**cls.defaults_for("digits", 5), "epochs": 2, **overrides}
    strategy = build(cls, tiny_vit(dim=DIM), n_tasks=5, **config)
    strategy.probe = torch.stack([stream_.train[0].dataset[i][0] for i in range(16)])
    return strategy


@torch.no_grad()
def merged_out(adapter, h):
    adapter.merge()
    try:
        return adapter(h)
    finally:
        adapter.unmerge()


@torch.no_grad()
def layer_inputs(strategy, experience, n=64):
    """qkv inputs of every adapted layer on ``n`` images of ``experience`` (the current net)."""
    x = torch.stack([experience.dataset[i][0] for i in range(n)])
    stored = {}
    hooks = [a.register_forward_pre_hook(lambda m, inp, i=i: stored.__setitem__(i, inp[0].clone()))
             for i, a in enumerate(strategy.adapters)]
    strategy.model_features(x)
    for h in hooks:
        h.remove()
    return [stored[i] for i in range(len(strategy.adapters))]


@pytest.fixture(scope="module")
def two_tasks(stream):
    strategy = make(stream)
    strategy.train(stream.train[0])
    strategy.features_end_task0 = strategy.model_features(strategy.probe)
    strategy.inputs_task0 = layer_inputs(strategy, stream.train[0])
    strategy.train(stream.train[1])
    return strategy


# ----------------------------------------------------------------- task boundary
def test_new_branch_starts_as_identity(two_tasks):
    s = two_tasks
    assert all(d.abs().sum() > 0 for d in s.designed)  # the new branch exists ...
    torch.testing.assert_close(s.probe_after_design, s.features_end_task0, atol=1e-6, rtol=0)
    # ... and the designed rows are orthonormal up to the official 1/√3
    for down in s.designed:
        torch.testing.assert_close(down @ down.T * 3, torch.eye(down.shape[0]), atol=1e-5, rtol=0)


def test_new_head_rows_are_a_default_nn_linear(two_tasks):
    """Official heads are default nn.Linear layers: weight and bias U(±1/√D) (the shared head's
    kaiming-linear init would reach √3/√D and leave a zero bias)."""
    weight, bias = two_tasks.new_head
    bound = DIM ** -0.5
    assert weight.shape == (2, DIM) and weight.abs().max() <= bound
    assert weight.abs().max() > 0.8 * bound and weight.std() > 0.4 * bound
    assert bias.abs().min() > 0 and bias.abs().max() <= bound


def test_down_rows_orthogonal_to_stored_basis_remove_mode(two_tasks):
    for down, (basis, retain) in zip(two_tasks.designed, two_tasks.bases_at_design):
        assert not retain and basis.shape[1] >= 1
        assert (down.double() @ basis).abs().max() < 1e-5


def test_down_rows_inside_complement_retain_mode():
    torch.manual_seed(0)
    d = 24
    memory = subspace.LayerMemory(d)
    spectrum = torch.linspace(1.0, 0.2, d, dtype=torch.float64)  # many directions: k > D/2
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    memory.update(q @ torch.diag(spectrum) @ q.T, eps=0.95)
    comp = memory.basis
    assert memory.retain and 3 <= comp.shape[1] <= d // 2
    # the implied protected space (the task's leading directions) is orthogonal to it
    assert (q[:, : d - comp.shape[1]].T @ comp).abs().max() < 1e-8
    a = torch.randn(d, 3 * d, dtype=torch.float64)
    down = subspace.design_down(a @ a.T, memory.projection_basis(), memory.retain, rank=3,
                                scale=3**-0.5)
    assert (down - down @ comp @ comp.T).abs().max() < 1e-5
    assert (comp.T @ comp - torch.eye(comp.shape[1], dtype=comp.dtype)).abs().max() < 1e-8


def test_old_task_layer_outputs_move_far_less_than_unconstrained_lora(stream):
    """Per layer, ‖Δ(k,v)‖/‖(k,v)‖ on stored task-0 inputs h after training task 1: InfLoRA vs
    the same training with an unprojected design (a data-aligned, unconstrained LoRA branch).
    λ_b close to 1 because the random tiny ViT's token spectrum is flat: the default threshold
    protects only ~60% of its input energy (the official energy criterion)."""
    drift = {}
    for project in (True, False):
        s = make(stream, project=project, lambda_b=0.99999, lr=1e-2)
        s.train(stream.train[0])
        inputs = layer_inputs(s, stream.train[0])
        protected = [h @ (m.basis @ m.basis.T).float() for h, m in zip(inputs, s.memories)]
        before = [merged_out(a, h) for a, h in zip(s.adapters * 2, inputs + protected)]
        s.train(stream.train[1])
        after = [merged_out(a, h) for a, h in zip(s.adapters * 2, inputs + protected)]
        change = [float((y1 - y0)[..., DIM:].norm() / y0[..., DIM:].norm())
                  for y0, y1 in zip(before, after)]
        drift[project] = max(change[: len(inputs)])
        if project:  # on the stored subspace itself the new branch is exactly silent
            assert max(change[len(inputs):]) < 1e-5
    assert drift[False] > 0.1  # the unconstrained branch does change old outputs
    assert drift[True] < 0.25 * drift[False], drift


# ----------------------------------------------------------------- training
def test_only_current_up_projections_and_head_train(two_tasks):
    s = two_tasks
    trainable = {id(p) for p in s.model.parameters() if p.requires_grad}
    expected = {id(p) for a in s.adapters for p in (a.up_k, a.up_v)}
    expected |= {id(p) for p in s.model.head.parameters()}
    assert trainable == expected
    # frozen tensors of task 1 stayed as designed / as folded after task 0
    for a, designed, trained in zip(s.adapters, s.designed, s.trained_down):
        assert torch.equal(designed, trained)
    for before, trained in zip(s.snap_before, s.trained_old_delta):
        assert torch.equal(before, trained)
    # one backward: gradients reach the up-projections and the current head rows only
    x, y = s.probe, torch.full((16,), s.known_classes)
    s.model.train()
    s.model.zero_grad()
    torch.nn.functional.cross_entropy(s.model(x)[:, s.known_classes:], y - s.known_classes).backward()
    assert all(p.grad is None for n, p in s.model.backbone.named_parameters()
               if "up_" not in n)
    assert all(a.up_k.grad.abs().sum() > 0 for a in s.adapters)
    assert s.model.head.fc.weight.grad[: s.known_classes].abs().sum() == 0
    assert s.model.head.fc.weight.grad[s.known_classes:].abs().sum() > 0


# ----------------------------------------------------------------- memory
def test_threshold_schedule():
    assert subspace.threshold(0.95, 1.0, 0, 10) == 0.95
    assert abs(subspace.threshold(0.95, 1.0, 9, 10) - 0.995) < 1e-12
    assert abs(subspace.threshold(0.98, 1.0, 4, 5) - 0.996) < 1e-12


def test_energy_uses_squared_singular_values_of_the_second_moment():
    s = torch.diag(torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    # shares of σ(S)²: 9/15, 13/15, 14/15, 1 → 2 below 0.9 (σ(S) itself would give 3)
    assert subspace.first_basis(s, 0.9).shape[1] == 2
    # remove mode with e1 stored: captured 9/15, +4/15 (<0.9), +1/15 → 2 new directions
    e1 = torch.eye(4, dtype=torch.float64)[:, :1]
    grown = subspace.extend_basis(s, e1, 0.9)
    assert grown.shape[1] == 3 and torch.allclose(grown[:, 0], e1[:, 0])


def test_dual_memory_bounded_by_half_and_monotone_in_remove_mode():
    torch.manual_seed(1)
    d = 24
    memory, previous, switched = subspace.LayerMemory(d), 0, False
    for task in range(10):
        a = torch.randn(d, 4, dtype=torch.float64) * torch.rand(4, dtype=torch.float64) * 3
        s = a @ a.T + 1e-3 * torch.eye(d, dtype=torch.float64)
        memory.update(s, subspace.threshold(0.95, 1.0, task, 10))
        assert memory.basis.shape[1] <= d // 2
        basis = memory.basis
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype),
                              atol=1e-8)
        if not memory.retain:
            assert basis.shape[1] >= previous
            previous = basis.shape[1]
        elif switched:  # complement only shrinks in retain mode
            assert basis.shape[1] <= previous
            previous = basis.shape[1]
        else:
            switched, previous = True, basis.shape[1]
    assert switched
    gpm = subspace.LayerMemory(d, dual=False)
    for task in range(10):
        a = torch.randn(d, 4, dtype=torch.float64)
        gpm.update(a @ a.T, 0.95)
    assert not gpm.retain and gpm.basis.shape[1] > d // 2


def test_second_moments_are_formed_in_float64():
    """Each batch's Gram matrix is computed in float64 (a float32 product, summed in float64
    afterwards, is off by whole units on these large, nearly equal tokens)."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    batches = [1000 + 0.01 * torch.randn(4, 64, 8, generator=g) for _ in range(3)]
    with subspace.SecondMoments([layer]) as moments:
        for x in batches:
            layer(x)
    exact = sum(x.reshape(-1, 8).double().T @ x.reshape(-1, 8).double() for x in batches)
    float32 = sum((x.reshape(-1, 8).T @ x.reshape(-1, 8)).double() for x in batches)
    assert moments.counts == [3 * 4 * 64]
    torch.testing.assert_close(moments.sums[0], exact, rtol=1e-14, atol=0)
    assert (float32 - exact).abs().max() > 1.0
    torch.testing.assert_close(moments.matrices()[0], exact / (3 * 4 * 64), rtol=1e-14, atol=0)


def test_strategy_records_schedule_and_bounded_bases(two_tasks):
    info = two_tasks.task_info()
    assert abs(info["threshold"] - subspace.threshold(0.95, 1.0, 1, 5)) < 1e-12
    assert all(1 <= k <= DIM // 2 for k in info["basis_dims"])


# ----------------------------------------------------------------- inference and resume
def test_merged_inference_equals_branch_sum():
    torch.manual_seed(0)
    qkv = torch.nn.Linear(DIM, 3 * DIM)
    adapter = InfLoRAAdapter(qkv, rank=4)
    x = torch.randn(2, 5, DIM)
    with torch.no_grad():
        for _ in range(2):  # one finished (folded) task and one in progress
            adapter.start_task(torch.randn(4, DIM))
            adapter.up_k.normal_()
            adapter.up_v.normal_()
            branch_sum = adapter(x)
            assert not adapter.merged
            merged_y = merged_out(adapter, x)
            torch.testing.assert_close(merged_y, branch_sum, atol=1e-5, rtol=1e-5)
            explicit = qkv(x) + torch.cat([torch.zeros(2, 5, DIM),
                                           adapter.slice_delta(x, "k"), adapter.slice_delta(x, "v")], -1)
            torch.testing.assert_close(merged_y, explicit, atol=1e-5, rtol=1e-5)
            adapter.fold()  # the folded delta is seen at once: no cache to go stale
            torch.testing.assert_close(adapter(x), branch_sum, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(merged_out(adapter, x), branch_sum, atol=1e-5, rtol=1e-5)


def test_checkpoint_restores_model_and_memory(two_tasks, stream):
    s = two_tasks
    state = s.checkpoint()
    fresh = make(stream)  # same pretrained backbone (checkpoints omit it), no tasks learnt
    assert not torch.allclose(fresh.model_features(s.probe), s.model_features(s.probe))
    fresh.load_checkpoint(state)
    torch.testing.assert_close(fresh.model_features(s.probe), s.model_features(s.probe))
    for m0, m1 in zip(s.memories, fresh.memories):
        assert torch.equal(m0.basis, m1.basis) and m0.retain == m1.retain
    assert fresh.task == 1 and fresh.task_info() == s.task_info()


# ----------------------------------------------------------------- InfLoRA+CA
def test_classifier_alignment_statistics_equal_a_direct_computation(stream):
    s = make(stream, cls=InfLoRACA, epochs=1)
    s.train(stream.train[0])
    data = stream.train[0].dataset
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    feats = features_of(s, images).double()
    for c in range(2):
        torch.testing.assert_close(s.gaussians.means[c], feats[labels == c].mean(0),
                                   atol=1e-5, rtol=1e-5)
        expected_cov = torch.cov(feats[labels == c].T) + s.config.cov_ridge * torch.eye(DIM)  # unbiased
        torch.testing.assert_close(s.gaussians.covs[c], expected_cov.float(), atol=1e-5, rtol=1e-4)
    assert s.gaussians.class_task == [0, 0]
    assert s.task_info()["aligned_classes"] == 0  # no CA after task 0


def official_alignment(fc, means, covs, class_task, task, task_sizes, cfg):
    """``_stage2_compact_classifier`` of the official methods/inflora_ca.py, rewritten: per epoch
    ``ca_samples`` features per class from N(μ_c·(0.9 + (τ_c+1)/(t+1)·0.1), Σ_c), one CPU shuffle,
    as many batches of ``ca_samples`` as classes, logits divided by the mean over tasks of each
    task's logit L2 norm (+1e-7) and by the temperature, SGD(lr, momentum 0.9, wd) on the whole
    head, CosineAnnealingLR over the CA epochs."""
    from torch.distributions import MultivariateNormal

    opt = torch.optim.SGD(fc.parameters(), lr=cfg.ca_lr, momentum=0.9, weight_decay=cfg.ca_weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.ca_epochs)
    n, k = len(means), cfg.ca_samples
    for _ in range(cfg.ca_epochs):
        data, label = [], []
        for c in range(n):
            decay = (class_task[c] + 1) / (task + 1) * 0.1
            mean = torch.tensor(means[c].numpy(), dtype=torch.float64) * (0.9 + decay)
            data.append(MultivariateNormal(mean.float(), covs[c].float()).sample(sample_shape=(k,)))
            label.extend([c] * k)
        x, y = torch.cat(data).float(), torch.tensor(label).long()
        order = torch.randperm(x.size(0))
        x, y = x[order], y[order]
        for it in range(n):
            logits = fc(x[it * k:(it + 1) * k])
            if cfg.ca_temperature:
                norms, start = [], 0
                for size in task_sizes:
                    norms.append(torch.norm(logits[:, start:start + size], p=2, dim=-1, keepdim=True) + 1e-7)
                    start += size
                norms = torch.cat(norms, dim=-1).mean(dim=-1, keepdim=True)
                logits = torch.div(logits[:, :n], norms) / cfg.ca_temperature
            loss = F.cross_entropy(logits, y[it * k:(it + 1) * k])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()


@pytest.mark.parametrize("temperature", [0.1, 0.0])
def test_classifier_alignment_matches_the_official_stage(stream, monkeypatch, temperature):
    """Three tasks of 2 classes: the head after CA equals the official stage's on the same
    statistics and random stream; CA draws exactly ca_samples per class and epoch and changes
    nothing but the head; the logit normalisation is applied (0 turns it off, differently)."""
    from torch.distributions import MultivariateNormal

    s = make(stream, cls=InfLoRACA, ca_samples=16, ca_epochs=3, ca_temperature=temperature)
    g = torch.Generator().manual_seed(3)
    s.task = 2
    s.model.head.grow(6)
    with torch.no_grad():
        s.model.head.fc.weight.normal_(generator=g)
        s.model.head.fc.bias.normal_(generator=g)
    s.gaussians.means = 2 * torch.randn(6, DIM, dtype=torch.float64, generator=g)
    a = torch.randn(6, DIM, DIM, generator=g)
    s.gaussians.covs = a @ a.transpose(1, 2) / DIM + 0.1 * torch.eye(DIM)
    s.gaussians.class_task = [0, 0, 1, 1, 2, 2]
    start_fc = {k: v.clone() for k, v in s.model.head.fc.state_dict().items()}
    backbone = {k: v.clone() for k, v in s.model.backbone.state_dict().items()}
    shapes, real_sample = [], MultivariateNormal.sample
    monkeypatch.setattr(MultivariateNormal, "sample",
                        lambda self, sample_shape=torch.Size(): shapes.append(tuple(sample_shape))
                        or real_sample(self, sample_shape))
    torch.manual_seed(11)
    align_classifier(s.model.head, s.gaussians, 2, s.config, s.device)
    assert shapes == [(16,)] * 6 * 3
    reference = torch.nn.Linear(DIM, 6)
    reference.load_state_dict(start_fc)
    torch.manual_seed(11)
    g2 = s.gaussians
    official_alignment(reference, g2.means, g2.covs, g2.class_task, 2, [2, 2, 2], s.config)
    torch.testing.assert_close(s.model.head.fc.weight, reference.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.model.head.fc.bias, reference.bias, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(s.model.head.fc.weight, start_fc["weight"])
    assert all(torch.equal(v, backbone[k]) for k, v in s.model.backbone.state_dict().items())
    other = torch.nn.Linear(DIM, 6)  # the other normalisation setting lands elsewhere
    other.load_state_dict(start_fc)
    torch.manual_seed(11)
    official_alignment(other, g2.means, g2.covs, g2.class_task, 2, [2, 2, 2],
                       s.Config(ca_samples=16, ca_epochs=3, ca_temperature=0.1 - temperature))
    assert not torch.allclose(other.weight, reference.weight, atol=1e-3)


def test_classifier_alignment_separates_replayed_classes(stream):
    s = make(stream, cls=InfLoRACA)
    s.task = 1
    s.model.head.grow(4)
    s.gaussians.means = 8 * torch.eye(4, DIM, dtype=torch.float64)
    s.gaussians.covs = 0.1 * torch.eye(DIM).repeat(4, 1, 1)
    s.gaussians.class_task = [0, 0, 1, 1]
    align_classifier(s.model.head, s.gaussians, 1, s.config, s.device)
    with torch.no_grad():
        predicted = s.model.head(s.gaussians.means.float()).argmax(1)
    assert predicted.tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------- options
def test_option_checks_are_usage_errors_before_training():
    for bad in (dict(optimizer="rmsprop"), dict(schedule="linear"), dict(memory="dualgpm"),
                dict(rank=0), dict(lambda_b=0.0), dict(lambda_b=0.99, lambda_e=0.9),
                dict(head_lr=0.0), dict(weight_decay=-1.0)):
        with pytest.raises(UsageError):
            InfLoRA.Config(**bad)
        with pytest.raises(UsageError):
            InfLoRACA.Config(**bad)
    for bad in (dict(ca_samples=0), dict(ca_lr=0.0), dict(ca_temperature=-0.1), dict(cov_ridge=0.0)):
        with pytest.raises(UsageError):
            InfLoRACA.Config(**bad)
    context = RunContext.for_backbone(tiny_vit(dim=DIM))
    InfLoRA.validate(InfLoRA.Config(rank=DIM), context)
    with pytest.raises(UsageError, match="rank"):
        InfLoRA.validate(InfLoRA.Config(rank=DIM + 1), context)
    assert InfLoRA.Config.lr_scaled_fields == ("head_lr",)
    assert InfLoRACA.Config.lr_scaled_fields == ("head_lr", "ca_lr")


def test_threshold_uses_the_run_context_task_count(stream):
    s = make(stream)
    s.context = RunContext.for_backbone(s.model.backbone, n_tasks=10)
    s.train(stream.train[0])
    assert s.task_info()["threshold"] == subspace.threshold(0.95, 1.0, 0, 10)
