"""SD-LoRA / -RR / -KD: the twelve properties of the reference (§9) and the harness contract.

Tiny timm ViTs for behaviour, ViT-B/16 shapes (random init) only for parameter counts.
"""
from __future__ import annotations


import pytest
import torch
from avalanche.core import SupervisedPlugin
from helpers import (DIM, Killed, build, digits_results, kill_after_task, tensor_stream,
                     tiny_vit)
from timm.models.vision_transformer import VisionTransformer
from torch.nn import functional as F

from clbench import runner
from clbench.adapters import QKVAdapter, merged
from clbench.context import RunContext
from clbench.errors import UsageError
from clbench.hparams import parse_override
from clbench.methods.lora.sdlora.adapter import DecoupledLoRA, least_squares_fit
from clbench.model import CLModel
from clbench.plan import RunPlan, method_config
from clbench.registry import METHODS

SDLoRA, SDLoRARR, SDLoRAKD = (METHODS.get(n) for n in ("sdlora", "sdlora-rr", "sdlora-kd"))
from clbench.methods.lora.sdlora import rank_for_task  # noqa: E402  (after registry discovery)


def lora_model(depth=2):
    model = CLModel(tiny_vit(depth=depth), DIM)
    model.backbone.requires_grad_(False)
    lora = DecoupledLoRA(model)
    model.add_state("sdlora_magnitudes", lora.magnitudes)  # as the strategy registers them
    return model, lora


def train_pair(lora, generator, scale=0.3):
    """Stand-in for training: random current B's and magnitudes."""
    for s in lora.slices():
        s.B_cur.data.copy_(scale * torch.randn(s.B_cur.shape, generator=generator))
    lora.magnitudes.alpha.data.copy_(0.5 + torch.rand(lora.n_tasks, generator=generator))


# ------------------------------------------------------------------ 1. zero-init identity
def test_zero_init_identity_with_frozen_backbone():
    frozen = tiny_vit()  # the same seeded weights, no adapters
    model, lora = lora_model()
    lora.begin_task(0, 4, "factor_product", reset_magnitudes=True, init=0.8)
    lora.magnitudes.alpha.data.fill_(3.7)  # any magnitude
    x = torch.rand(3, 3, 16, 16)
    for train in (True, False):
        model.train(train)
        assert torch.equal(model.features(x), frozen(x))
        with torch.no_grad(), merged(model):
            assert torch.equal(model.features(x), frozen(x))


# ------------------------------------------------------------------ integration run: 2, 3, 4, 6
class Probe(SupervisedPlugin):
    """Gradients at the first step of task 1; head and adapter state after every task."""

    def __init__(self):
        super().__init__()
        self.grads, self.states = None, []

    def after_backward(self, strategy, **kwargs):
        if strategy.task == 1 and self.grads is None:
            self.grads = {n: (None if p.grad is None else p.grad.clone())
                          for n, p in strategy.model.named_parameters()}
            self.known = strategy.known_classes

    def after_training_exp(self, strategy, **kwargs):
        self.states.append({k: v.clone() for k, v in strategy.model.state_dict().items()})


@pytest.fixture(scope="module")
def trained():
    stream = tensor_stream(n_classes=6, n_tasks=3, train_per_class=12)
    probe = Probe()
    vit = tiny_vit()
    pretrained = {k: v.clone() for k, v in vit.state_dict().items()}
    strategy = build(SDLoRA, vit, [probe], n_tasks=3, epochs=2, lr=0.05, batch_size=8, ranks=[4])
    counts = []
    for t in range(3):
        strategy.train(stream.train[t])
        counts.append(strategy.trained_parameter_count)
    return strategy, probe, pretrained, counts


def test_old_directions_and_pretrained_weights_bit_identical(trained):
    strategy, probe, pretrained, _ = trained
    first, last = probe.states[0], probe.states[2]
    slice_keys = [k for k in first if ".slices." in k and k.rsplit(".", 1)[1] in ("A", "B")]
    assert len(slice_keys) == 2 * 2 * 2  # 2 blocks × {q, v} × {A, B}
    for key in slice_keys:
        rank = first[key].shape[0] if key.endswith(".A") else first[key].shape[1]
        old = last[key][:rank] if key.endswith(".A") else last[key][:, :rank]
        assert torch.equal(old, first[key]), key
    now = strategy.model.backbone.state_dict()
    for key, value in pretrained.items():
        mapped = key.replace("attn.qkv.", "attn.qkv.qkv.")
        assert torch.equal(now[mapped], value), key


def test_exactly_the_right_parameters_get_gradients(trained):
    _, probe, _, _ = trained
    grads = probe.grads
    with_grad = {n for n, g in grads.items() if g is not None}
    lora_pairs = {n for n in grads if n.endswith(("A_cur", "B_cur"))}
    assert len(lora_pairs) == 2 * 2 * 2
    assert with_grad == lora_pairs | {"sdlora_magnitudes.alpha", "head.fc.weight", "head.fc.bias"}
    # B_1 = 0 at the first step: no gradient reaches A_1 or α_1, while B_1 and α_0 move
    for n in lora_pairs:
        if n.endswith("A_cur"):
            assert torch.count_nonzero(grads[n]) == 0, n
        else:
            assert torch.count_nonzero(grads[n]) > 0, n
    alpha = grads["sdlora_magnitudes.alpha"]
    assert alpha.shape == (2,) and alpha[1] == 0 and alpha[0] != 0
    known = probe.known
    assert torch.count_nonzero(grads["head.fc.weight"][:known]) == 0
    assert torch.count_nonzero(grads["head.fc.bias"][:known]) == 0
    assert torch.count_nonzero(grads["head.fc.weight"][known:]) > 0


def test_old_head_rows_unchanged(trained):
    _, probe, _, _ = trained
    for t in (1, 2):
        before, after = probe.states[t - 1], probe.states[t]
        rows = before["head.fc.weight"].shape[0]
        assert torch.equal(after["head.fc.weight"][:rows], before["head.fc.weight"])
        assert torch.equal(after["head.fc.bias"][:rows], before["head.fc.bias"])
        assert not torch.equal(after["head.fc.weight"][rows:], torch.zeros_like(after["head.fc.weight"][rows:]))


def test_lora_pairs_and_magnitudes_actually_train(trained):
    """Fails when LoRA never trains: every stored B (zero-initialised) moved, every magnitude
    left its 0.8 start, and the adapted features differ from the frozen backbone's."""
    strategy, probe, pretrained, _ = trained
    for s in strategy.lora.slices():
        assert [t for t, _ in s.components()] == [0, 1, 2]
        for _, cols in s.spans():
            assert s.B[:, cols].abs().max() > 1e-7  # zero-initialised: exactly 0 if untrained
    alpha = strategy.lora.magnitudes.alpha.detach()
    assert alpha.numel() == 3 and (alpha - 0.8).abs().min() > 1e-5, alpha
    frozen = tiny_vit()
    frozen.load_state_dict(pretrained)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), merged(strategy.model):
        change = (strategy.model.features(x) - frozen(x)).norm() / frozen(x).norm()
    assert change > 1e-3


def test_merge_is_an_explicit_state():
    """eval() merges nothing; merge() snapshots W + ΔW (bit-identical to merged_weight), the
    forward then runs on it, W0 stays untouched, training while merged is refused, and
    unmerge() returns to the unmerged path."""
    model, lora = lora_model()
    lora.begin_task(0, 3, "factor_product", reset_magnitudes=True, init=0.8)
    train_pair(lora, torch.Generator().manual_seed(8))
    model.eval()
    adapters = lora.adapters
    assert not any(a.merged for a in adapters)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        unmerged = model.features(x)
    w0 = [a.qkv.weight.clone() for a in adapters]
    with torch.no_grad(), merged(model) as m:
        assert m is model and all(a.merged for a in adapters)
        assert all(torch.equal(a._merged_weight, a.merged_weight()) for a in adapters)
        torch.testing.assert_close(model.features(x), unmerged, atol=1e-5, rtol=1e-5)
    assert not any(a.merged for a in adapters)
    assert all(torch.equal(a.qkv.weight, w) for a, w in zip(adapters, w0))
    adapters[0].merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        model.features(x)  # grad enabled, trainable pair: merged training is an error
    with merged(model):  # already merged by the caller: stays merged afterwards
        pass
    assert adapters[0].merged and not adapters[1].merged
    adapters[0].unmerge()
    torch.testing.assert_close(model.features(x).detach(), unmerged)


def test_option_checks_are_usage_errors_before_training():
    for bad in (dict(mode="exact"), dict(ranks=[0]), dict(rank_milestones=[3, 1], ranks=[4, 3, 2]),
                dict(lr_milestones=[5, 2]), dict(lr_decay=0.0), dict(first_task_lr=-1.0),
                dict(kd_threshold=-1e-3)):
        with pytest.raises(UsageError):
            SDLoRA.Config(**bad)
    context = RunContext.for_backbone(tiny_vit())
    SDLoRA.validate(SDLoRA.Config(ranks=[DIM]), context)
    with pytest.raises(UsageError, match="ranks"):
        SDLoRARR.validate(SDLoRARR.Config(ranks=[DIM + 1, 4, 2]), context)
    # the --lr budget contract: the first task's own lr scales with lr
    assert SDLoRA.Config.lr_scaled_fields == ("first_task_lr",)
    assert "first_task_lr" in {f.name for f in __import__("dataclasses").fields(SDLoRA.Config)}


def test_normalisation_mode_pinned_and_magnitudes_reset(trained):
    strategy = trained[0]
    assert SDLoRA.Config().mode == "official" and strategy.norm == "factor_product"
    assert torch.optim.SGD is type(strategy.make_optimizer_for_task([torch.nn.Parameter(torch.ones(1))]))
    for s in strategy.lora.slices():
        for _, cols in list(s.spans())[:-1]:  # the last one is still raw until the next task
            A, B = s.A[cols], s.B[:, cols]
            assert s.col_inv_norm[cols.start] == pytest.approx(1 / (B.norm() * A.norm()).item(), rel=1e-6)
            direction = (B * s.col_inv_norm[cols]) @ A
            assert direction.norm() < 1  # ‖BA‖ < ‖B‖‖A‖ for these rank-4 factors
    # the trained model's parameter count: 2 blocks × 2 × (24·4·2) LoRA + t magnitudes + head
    assert trained[3] == [768 + 1 + 24 * 2 + 2, 768 + 2 + 24 * 4 + 4, 768 + 3 + 24 * 6 + 6]


@pytest.mark.parametrize("norm,exact_unit", [("factor_product", False), ("frobenius", True)])
def test_direction_norms(norm, exact_unit):
    _, lora = lora_model()
    g = torch.Generator().manual_seed(1)
    for t in range(3):
        lora.begin_task(t, 4, norm, reset_magnitudes=norm == "factor_product", init=1.0)
        train_pair(lora, g)
        lora.end_task(None, norm)
    lora.begin_task(3, 4, norm, reset_magnitudes=False, init=1.0)
    for s in lora.slices():
        for d in s.directions():
            if exact_unit:
                assert d.norm().item() == pytest.approx(1.0, abs=1e-5)
            else:
                assert d.norm().item() < 1.0 - 1e-3


def test_magnitudes_reset_in_official_mode_carried_in_paper_mode():
    for reset, expected in ((True, [0.8, 0.8]), (False, [1.3, 0.8])):
        _, lora = lora_model()
        lora.begin_task(0, 2, "frobenius", reset_magnitudes=reset, init=0.8)
        lora.magnitudes.alpha.data.fill_(1.3)
        lora.end_task(None, "frobenius")
        lora.begin_task(1, 2, "frobenius", reset_magnitudes=reset, init=0.8)
        assert lora.magnitudes.alpha.tolist() == pytest.approx(expected)


def test_mode_selects_optimizer_and_per_benchmark_defaults():
    plan = RunPlan(run_dir="unused")
    cfg = lambda bench, *o: method_config(SDLoRA, bench, 10, plan, [parse_override(x) for x in o])  # noqa: E731
    official = cfg("imagenet-r")
    assert (official.mode, official.lr, official.epochs, official.batch_size, official.init_magnitude) == \
        ("official", 0.01, 20, 128, 0.8)
    paper = cfg("imagenet-r", "sdlora.mode=paper")
    assert (paper.lr, paper.epochs, paper.init_magnitude) == (0.008, 30, 1.0)
    assert cfg("domainnet", "sdlora.mode=paper").epochs == 10
    ina = cfg("imagenet-a")
    assert (ina.first_task_lr, ina.lr, ina.lr_milestones, ina.lr_decay) == (0.01, 0.005, [10, 15], 0.05)
    dom = cfg("domainnet")
    assert (dom.epochs, dom.lr, dom.lr_milestones, dom.lr_decay) == (10, 0.02, [4, 6, 8], 0.005)
    assert cfg("cifar100").lr == 0.008 and cfg("cub200").lr_milestones == [10, 15]
    strategy = build(SDLoRA, tiny_vit(), mode="paper")
    assert strategy.norm == "frobenius"
    assert type(strategy.make_optimizer_for_task([torch.nn.Parameter(torch.ones(1))])) is torch.optim.Adam


# ------------------------------------------------------------------ 5. merge equivalence
def test_merged_weight_equivalence_q_v_and_k_untouched():
    model, lora = lora_model()
    g = torch.Generator().manual_seed(2)
    factors = []  # independent record of every (A, B) per slice
    for t in range(3):
        lora.begin_task(t, 3, "factor_product", reset_magnitudes=True, init=0.8)
        train_pair(lora, g)
        factors.append([(s.A_cur.detach().clone(), s.B_cur.detach().clone()) for s in lora.slices()])
        if t < 2:
            lora.end_task(None, "factor_product")
    alpha = lora.magnitudes.alpha.detach()
    x = torch.randn(2, 5, DIM)
    for a, adapter in enumerate(lora.adapters):
        w = adapter.qkv.weight.detach().clone()
        for j, target in enumerate(("q", "v")):
            delta = torch.zeros(DIM, DIM)
            for t in range(3):
                A, B = factors[t][2 * a + j]
                coef = alpha[t] / (B.norm() * A.norm()) if t < 2 else alpha[t]  # last one raw
                delta += coef * B @ A
            row = {"q": 0, "v": 2}[target] * DIM
            w[row:row + DIM] += delta
        expected = F.linear(x, w, adapter.qkv.bias)
        assert not adapter.merged
        assert torch.allclose(adapter(x), expected, atol=1e-5)  # fused training path
        assert torch.allclose(QKVAdapter.unmerged_forward(adapter, x), expected, atol=1e-5)  # low-rank
        pretrained = adapter.qkv.weight.clone()
        adapter.merge()
        with torch.no_grad():
            assert adapter.merged and torch.allclose(adapter(x), expected, atol=1e-5)
        adapter.unmerge()
        assert torch.equal(adapter.qkv.weight, pretrained)  # merging never touches W0
        assert torch.equal(adapter.merged_weight()[DIM:2 * DIM], adapter.qkv.weight[DIM:2 * DIM])


def lora_in_task(n_tasks: int, g: torch.Generator):
    """SD-LoRA after ``n_tasks`` trained tasks, the last one still open (its pair trainable)."""
    _, lora = lora_model()
    for t in range(n_tasks):
        lora.begin_task(t, 3, "factor_product", reset_magnitudes=True, init=0.8)
        train_pair(lora, g)
        if t < n_tasks - 1:
            lora.end_task(None, "factor_product")
    return lora


def step_parameters(lora, adapter, x):
    """What a training step differentiates: the input, the magnitudes and the current pairs."""
    return [x, lora.magnitudes.alpha] + [p for s in adapter.slices.values() for p in (s.A_cur, s.B_cur)]


def test_fast_training_step_matches_low_rank_autograd():
    """The merged-weight autograd Function gives the same gradients as plain low-rank autograd."""
    g = torch.Generator().manual_seed(3)
    lora = lora_in_task(3, g)
    adapter = lora.adapters[1]
    adapter.train()
    x = torch.randn(2, 5, DIM, requires_grad=True)
    params = step_parameters(lora, adapter, x)
    upstream = torch.randn(2, 5, 3 * DIM, generator=g)
    fast = torch.autograd.grad(adapter(x), params, upstream)
    slow = torch.autograd.grad(QKVAdapter.unmerged_forward(adapter, x), params, upstream)
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, atol=1e-5)


def test_fast_training_step_under_bf16_autocast():
    """The fused step runs under autocast (training precision bf16): gradients keep the
    parameters' dtype and agree with the fp32 ones to bf16 accuracy."""
    g = torch.Generator().manual_seed(3)
    lora = lora_in_task(2, g)
    adapter = lora.adapters[0]
    x = torch.randn(2, 5, DIM, requires_grad=True)
    params = step_parameters(lora, adapter, x)
    upstream = torch.randn(2, 5, 3 * DIM, generator=g)
    exact = torch.autograd.grad(adapter(x), params, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(x)
    assert out.dtype == torch.bfloat16
    low = torch.autograd.grad(out, params, upstream.bfloat16())
    for p, a, b in zip(params, exact, low):
        assert b.dtype == p.dtype
        assert (a - b).norm() <= 0.05 * a.norm()


# ------------------------------------------------------------------ 7. magnitude sharing
def test_one_magnitude_per_task_shared_by_every_slice():
    model, lora = lora_model(depth=3)
    g = torch.Generator().manual_seed(4)
    for t in range(3):
        lora.begin_task(t, 2, "factor_product", reset_magnitudes=True, init=0.8)
        train_pair(lora, g)
        lora.end_task(None, "factor_product")
    lora.begin_task(3, 2, "factor_product", reset_magnitudes=True, init=0.8)
    magnitude_params = [n for n, _ in model.named_parameters() if "magnitude" in n]
    assert magnitude_params == ["sdlora_magnitudes.alpha"] and lora.magnitudes.alpha.numel() == 4
    assert all(adapter.magnitudes is lora.magnitudes for adapter in lora.adapters)
    before = [s.delta_weight(lora.magnitudes.alpha).detach() for s in lora.slices()]
    with torch.no_grad():
        lora.magnitudes.alpha[1] += 0.25
    for s, old in zip(lora.slices(), before):
        component = s.directions()[1].float()
        assert torch.allclose(s.delta_weight(lora.magnitudes.alpha).detach() - old, 0.25 * component, atol=1e-6)


# ------------------------------------------------------------------ 8. parameter counts (ViT-B/16 shapes)
def test_parameter_counts_vit_b16_shapes():
    import timm

    with torch.device("meta"):  # shapes only: skip ViT-B's weight init (seconds)
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    model = CLModel(vit.to_empty(device="cpu"), 768)
    model.backbone.requires_grad_(False)
    lora = DecoupledLoRA(model)
    for task, rank, expected in ((0, 10, 368_640), (1, 8, 294_912), (2, 6, 221_184)):
        lora.begin_task(task, rank, "factor_product", reset_magnitudes=True, init=0.8)
        pairs = sum(s.A_cur.numel() + s.B_cur.numel() for s in lora.slices())
        trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
        assert pairs == trainable == expected
        assert lora.magnitudes.alpha.numel() == task + 1
        lora.end_task(None, "factor_product")


# ------------------------------------------------------------------ 9. RR schedule
def test_rank_reduction_schedule_and_old_ranks_kept():
    config = SDLoRARR.Config()
    schedule = [rank_for_task(config, t) for t in range(12)]
    assert schedule == [10] * 4 + [8] * 4 + [6] * 4
    assert [rank_for_task(SDLoRA.Config(), t) for t in (0, 9, 30)] == [10, 10, 10]
    _, lora = lora_model()
    small = SDLoRARR.Config(ranks=[3, 2, 1], rank_milestones=[4, 8])
    for t in range(10):
        lora.begin_task(t, rank_for_task(small, t), "factor_product", reset_magnitudes=True, init=0.8)
        lora.end_task(None, "factor_product")
    for s in lora.slices():
        assert s.components() == [[t, rank_for_task(small, t)] for t in range(10)]
    with pytest.raises(Exception, match="ranks"):
        SDLoRARR.Config(ranks=[10, 8])


# ------------------------------------------------------------------ 10. KD
def test_least_squares_fit_recovers_coefficients():
    g = torch.Generator().manual_seed(5)
    old = [torch.randn(DIM, DIM, generator=g, dtype=torch.float64) for _ in range(3)]
    coefficients, residual = least_squares_fit(0.7 * old[0] - 1.2 * old[2], old)
    assert coefficients.tolist() == pytest.approx([0.7, 0.0, -1.2], abs=1e-9)
    assert residual < 1e-10


def test_kd_absorbs_exact_combination_and_rejects_random_direction():
    tau = SDLoRAKD.Config().kd_threshold
    assert tau == 9e-4 and SDLoRA.Config().kd_threshold is None
    _, lora = lora_model()
    g = torch.Generator().manual_seed(6)
    lora.begin_task(0, 3, "factor_product", reset_magnitudes=True, init=0.8)
    train_pair(lora, g)
    lora.end_task(tau, "factor_product")
    lora.begin_task(1, 3, "factor_product", reset_magnitudes=True, init=0.8)
    train_pair(lora, g)
    info = lora.end_task(tau, "factor_product")  # a random new direction: kept everywhere
    assert info["kd_absorbed"] == 0 and info["kd_fitted"] == 4 and info["kd_residual_min"] > 100 * tau
    assert lora.stored_directions() == 2 * 4
    # task 2: the new pair is an exact combination 0.6·D_0 − 0.9·D_1 of each slice's directions
    lora.begin_task(2, 6, "factor_product", reset_magnitudes=True, init=0.8)
    with torch.no_grad():
        lora.magnitudes.alpha.copy_(torch.tensor([0.9, 1.1, 1.4]))
        for s in lora.slices():
            (_, c0), (_, c1) = s.spans()
            s.A_cur.copy_(torch.cat([s.A[c0], s.A[c1]]))
            s.B_cur.copy_(torch.cat([0.6 * s.B[:, c0] * s.col_inv_norm[c0],
                                     -0.9 * s.B[:, c1] * s.col_inv_norm[c1]], dim=1))
    before = [a.merged_weight() for a in lora.adapters]
    info = lora.end_task(tau, "factor_product")
    assert info["kd_absorbed"] == 4 and info["kd_residual_max"] < 1e-6
    assert lora.stored_directions() == 2 * 4  # the direction count stays
    for s in lora.slices():
        assert s.A_cur is None and s.components() == [[0, 3], [1, 3]]
        assert float(s.col_offset.abs().max()) > 0
    for adapter, w in zip(lora.adapters, before):
        assert torch.allclose(adapter.merged_weight(), w, atol=1e-5)
    assert lora.structure()["n_tasks"] == 3


# ------------------------------------------------------------------ 11. no 21-task limit
def test_twenty_five_tasks():
    stream = tensor_stream(n_classes=50, n_tasks=25, train_per_class=2, img=8)
    vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=12, depth=1, num_heads=2, num_classes=0)
    strategy = build(SDLoRA, vit, n_tasks=25, epochs=1, lr=0.01, batch_size=8, eval_batch_size=64,
                     ranks=[2])
    for t in range(25):
        strategy.train(stream.train[t])
    with merged(strategy.model):
        correct, total = strategy.evaluate_counts(stream.test[:25])
    assert len(correct) == 25 and sum(total) == 100
    assert strategy.lora.magnitudes.alpha.numel() == 25
    for s in strategy.lora.slices():
        assert s.components() == [[t, 2] for t in range(25)]
    assert strategy.task_info()["stored_directions"] == 25 * 2


# ------------------------------------------------------------------ 12. resume, and forgetting on digits
@pytest.mark.slow
def test_resume_mid_run_gives_identicaldigits_results(tmp_path, monkeypatch, tiny_checkpoint):
    overrides = ["sdlora-rr.rank_milestones=[1,2]", "sdlora-rr.ranks=[4,3,2]"]
    plan = lambda name: RunPlan(run_dir=str(tmp_path / name), methods=["sdlora-rr"],  # noqa: E731
                                       checkpoint=str(tiny_checkpoint), epochs=1, overrides=overrides)
    runner.run(plan("full"), log=lambda *_: None)
    kill_after_task(monkeypatch)  # right after task 2 is fully recorded
    with pytest.raises(Killed):
        runner.run(plan("resumed"), log=lambda *_: None)
    logs = []
    runner.run(plan("resumed"), log=logs.append)
    assert any("resuming after task 2" in line for line in logs), logs
    full, resumed = digits_results(tmp_path / "full", "sdlora-rr"), digits_results(tmp_path / "resumed", "sdlora-rr")
    assert resumed["complete"] and resumed["correct"] == full["correct"]
    assert resumed["method_info"] == full["method_info"]  # magnitudes, ranks, direction counts
    assert [info["rank"] for info in full["method_info"]] == [4, 3, 2, 2, 2]
    ckpt = [torch.load(tmp_path / d / "digits-5tasks/sdlora-rr/seed-1993/checkpoint.pt", weights_only=True)
            for d in ("full", "resumed")]
    for key, value in ckpt[0]["model"].items():
        assert torch.equal(value, ckpt[1]["model"][key]), key


@pytest.mark.slow
def test_sdlora_trains_and_forgets_less_than_finetune_on_digits(tmp_path):
    """End to end on digits (2 epochs, seed 1993). Beating finetune alone would also hold for a
    LoRA that never trains (a frozen backbone forgets less), so: SD-LoRA must beat the frozen
    linear probe too, and its checkpoint must hold trained pairs and moved magnitudes."""
    plan = RunPlan(run_dir=str(tmp_path / "r"), methods=["sdlora", "finetune", "linear-probe"],
                          epochs=2)
    runner.run(plan, log=lambda *_: None)
    sdlora, finetune, probe = (digits_results(tmp_path / "r", m) for m in ("sdlora", "finetune", "linear-probe"))
    assert sdlora["forward_passes_per_image"] == 1
    assert sdlora["metrics"]["forgetting"] < finetune["metrics"]["forgetting"]
    assert sdlora["metrics"]["final_acc"] > finetune["metrics"]["final_acc"]
    assert sdlora["metrics"]["final_acc"] > probe["metrics"]["final_acc"]
    for task, info in enumerate(sdlora["method_info"]):
        assert len(info["magnitudes"]) == task + 1
        assert all(abs(a - 0.8) > 1e-4 for a in info["magnitudes"]), info  # trained from 0.8
    ckpt = torch.load(tmp_path / "r/digits-5tasks/sdlora/seed-1993/checkpoint.pt", weights_only=True)
    stored_B = [v for k, v in ckpt["model"].items() if k.endswith(".B") and ".slices." in k]
    assert stored_B and all(b.shape[1] == 5 * 10 for b in stored_B)
    for b in stored_B:  # every task's zero-initialised B moved in every slice
        assert all(b[:, 10 * t:10 * (t + 1)].abs().max() > 1e-4 for t in range(5))
