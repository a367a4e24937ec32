"""HiDe-Prompt: parity with a reference written from the official thu-ml/HiDe-Prompt code (task
identity from the original model's MLP head, prefix prompts — the intended split and the official
EPrompt reshape — prompt momentum, contrastive regulariser, the official timm schedulers per
parameter group), statistics, frozen old prompts and Gaussian replay from stored statistics only."""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from avalanche.core import SupervisedPlugin
from timm.optim import create_optimizer
from timm.scheduler import create_scheduler
from torch.nn import functional as F

from clbench import plan as run_plan
from clbench.class_stats import ClassStatistics
from clbench.errors import UsageError
from clbench.methods.prompt import hide_mechanisms, hide_prompt
from clbench.methods.prompt.hide_mechanisms import (contrastive_regulariser, gaussian_replay,
                                                    official_layout)
from clbench.methods.prompt.hide_prompt import HiDePrompt, HiDePromptConfig
from helpers import build, tensor_stream, tiny_vit
from test_dualprompt import reference_forward


pytestmark = pytest.mark.usefixtures("one_thread")


def make(n_tasks=3, classes=(2, 2, 2), **config):
    s = build(HiDePrompt, tiny_vit(dim=24, depth=5), n_tasks=n_tasks, prompt_length=3, **config)
    for task, n in enumerate(classes):  # the head/TII growth the core does at each task start
        s.task, s.known_classes = task, s.model.head.n_classes
        s.model.head.grow(n)
        s.before_task(task)
    torch.manual_seed(1)
    with torch.no_grad():  # random weights (the copies made at task starts would hide mix-ups)
        s.model.prompt.normal_()
        for p in s.model.tii.parameters():
            p.normal_(0, 0.5)
    return s


def batch(s, x, y, training, task):
    s.is_training, s.task = training, task
    s.mbatch = [x, y, torch.zeros(len(x), dtype=torch.long)]


def reference_tii(s, x):
    """Original model (vits/hide_prompt_vision_transformer.py): pre_logits = CLS after the final
    norm of the un-prompted ViT; MlpMapping([2]) = LN(x + fc2(GELU(fc1 x))); linear head."""
    t = s.model.tii
    f = s.model.backbone.forward_features(x)[:, 0]
    h = t.fc2(F.gelu(t.fc1(f))) + f
    return t.head.fc(F.layer_norm(h, h.shape[-1:], t.norm.weight, t.norm.bias, t.norm.eps))


def reference_prefixes(prompt, length):
    """The intended split (clbench's default ``prompt_layout``): per-image prompts
    (layers, B, 2L, D) — the official (layers, 2, pool, L, D) stored as (layers, pool, 2L, D),
    indexed per image — give each image its own dual index 0 as keys and 1 as values. (The
    official EPrompt reshape does not; see ``official_eprompt``.)"""
    return {layer: (prompt[layer][..., :length, :], prompt[layer][..., length:, :])
            for layer in range(prompt.shape[0])}


def official_eprompt(prompt, idx, length, task=0, momentum=0.0):
    """peft/prompt/hide_prompt.py ``EPrompt.forward`` with prefix tuning (top-1) on the strategy's
    prompt: the official parameter is (layers, 2, pool, L, heads, D/heads) — here (layers, pool, 2L,
    D), so the same weights are viewed in the official shape (heads merged); ``batched_prompt_raw
    = prompt[:, :, idx]`` with idx (B, 1), while training with momentum mixed with the detached
    mean of prompts [0, task) (``.mean(2, keepdim=True).unsqueeze(2).repeat(1, 1, B, …)``), then
    ``.reshape(layers, B, 2, L, …)``; attention.py takes [:, 0] as key and [:, 1] as value
    prefix."""
    layers, pool, rows, dim = prompt.shape
    official = prompt.reshape(layers, pool, 2, length, dim).permute(0, 2, 1, 3, 4)
    raw = official[:, :, idx]  # layers, 2, B, 1, L, D
    if momentum > 0:
        old = official[:, :, 0:task].detach().clone().mean(2, keepdim=True).unsqueeze(2)
        raw = (1 - momentum) * raw + momentum * old.repeat(1, 1, idx.shape[0], 1, 1, 1)
    n, dual, b, top_k, length_, d = raw.shape
    batched = raw.reshape(n, b, dual, top_k * length_, d)  # the official reshape
    return {layer: (batched[layer][:, 0], batched[layer][:, 1]) for layer in range(n)}


def own_feature_rows(s, x):
    """TII head rows = each image's own TII feature (centred), so the images of ``x`` get
    several task identities: logits (h_i - m)·(h_j - m)."""
    with torch.no_grad():
        t = s.model.tii
        f = s.model.backbone.forward_features(x)[:, 0]
        h = t.norm(f + t.fc2(F.gelu(t.fc1(f))))
        t.head.fc.weight.copy_(h - h.mean(0))
        t.head.fc.bias.copy_(-(h.mean(0) * (h - h.mean(0))).sum(1))


def test_inference_matches_the_official_uninstructed_then_prompted_passes():
    s = make()
    x = torch.rand(6, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    own_feature_rows(s, x)
    with torch.no_grad():
        class_ids = reference_tii(s, x).argmax(dim=1)
        tasks = class_ids // 2  # target_task_map
        prompt = s.model.prompt[:, tasks]  # layers, B, 2L, D
        expected = reference_forward(s.model.backbone, x, reference_prefixes(prompt, 3), s.model.head)
        batch(s, x, y, training=False, task=2)
        torch.testing.assert_close(s.forward(), expected, rtol=1e-5, atol=1e-5)
    assert len(set(tasks.tolist())) > 1  # the check exercised several task identities
    assert s._task_hits.tolist() == [int((tasks == y // 2).sum()), 6]


def test_training_pass_uses_the_task_prompt_mixed_by_momentum_and_the_regulariser():
    s = make(prompt_momentum=0.3, reg=0.5)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([4, 5, 4, 5])
    s.known_classes = 4
    s._old_means = torch.randn(4, 24)
    batch(s, x, y, training=True, task=2)
    logits = s.forward()
    with torch.no_grad():
        p = s.model.prompt
        mixed = 0.7 * p[:, 2] + 0.3 * p[:, 0:2].mean(dim=1)  # EPrompt.forward, prompt_momentum
        prefixes = reference_prefixes(mixed.unsqueeze(1).expand(-1, 4, -1, -1), 3)
        expected = reference_forward(s.model.backbone, x, prefixes, s.model.head)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # official orth_loss: M = [old means; features], CE(M Mᵀ / 0.8, arange)
    feats = s._features
    m = torch.cat([s._old_means, feats])
    official = F.cross_entropy(m @ m.T / 0.8, torch.arange(8))
    tii_ce = F.cross_entropy(reference_tii(s, x)[:, 4:], y - 4)
    torch.testing.assert_close(s.extra_loss(), 0.5 * official + tii_ce)
    s.extra_loss().backward()
    assert torch.all(s.model.prompt.grad[:, :2] == 0) and s.model.prompt.grad[:, 2].abs().sum() > 0


def _inference(s, x, y, monkeypatch):
    """Logits of the inference forward and, per image, the task whose prompt its prompted pass
    used (read from the prompts handed to that pass, whatever chose them)."""
    passes = []
    real = s.prompted_features

    def spy(images, prompts):
        passes.append(prompts.detach().clone())
        return real(images, prompts)

    monkeypatch.setattr(s, "prompted_features", spy)
    batch(s, x, y, training=False, task=2)
    with torch.no_grad():
        logits = s.forward()
    monkeypatch.undo()
    assert len(passes) == 1, "inference runs one prompted pass (after the frozen query pass)"
    used = passes[0]  # layers, B, 2L, D: each image's prompt
    stored = s.model.prompt.detach()  # layers, tasks, 2L, D
    matches = torch.stack([(used[:, b, None] == stored).flatten(2).all(2).all(0)
                           for b in range(len(x))])  # B, tasks
    assert bool((matches.sum(1) == 1).all()), "each image reads exactly one task's prompt"
    return logits, matches.float().argmax(1)


def test_task_identity_comes_from_the_frozen_features_not_the_prompted_ones(monkeypatch):
    """The prompts play no part in choosing the prompt: perturbing every prompt leaves each
    image's task unchanged (and equal to the official TII on the un-prompted feature) while the
    prompted logits change. A task identity computed from a prompted pass would move."""
    s = make()
    x, y = torch.rand(6, 3, 16, 16), torch.arange(6)
    own_feature_rows(s, x)
    logits, tasks = _inference(s, x, y, monkeypatch)
    assert len(set(tasks.tolist())) > 1  # several task identities are exercised
    torch.testing.assert_close(tasks, reference_tii(s, x).argmax(1) // 2, rtol=0, atol=0)
    with torch.no_grad():
        s.model.prompt.mul_(-3.0).add_(torch.randn_like(s.model.prompt))
    perturbed_logits, perturbed_tasks = _inference(s, x, y, monkeypatch)
    torch.testing.assert_close(perturbed_tasks, tasks, rtol=0, atol=0)
    assert (perturbed_logits - logits).abs().max() > 1e-3  # the prompts do reach the logits


def _train(s, stream, task):
    s.train(stream.train[task])
    return {k: v.detach().clone() for k, v in s.model.state_dict().items() if not k.startswith("backbone.")}


def test_statistics_old_prompts_and_replay_over_two_tasks(monkeypatch):
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=6)
    s = build(HiDePrompt, tiny_vit(dim=24, depth=5), n_tasks=2, epochs=2, batch_size=6, lr=0.01,
              prompt_length=2, tap_epochs=2, tii_epochs=1, schedule="constant")
    replayed = []
    real = hide_mechanisms.gaussian_replay

    def spy(stats, classes, per_class, generator, jitter=1e-4):
        replayed.append((stats, classes))
        return real(stats, classes, per_class, generator, jitter)

    monkeypatch.setattr(hide_mechanisms, "gaussian_replay", spy)
    after0 = _train(s, stream, 0)
    assert replayed == []  # no refinement after the first task
    # statistics of task 0 equal a direct computation over its training images
    data = stream.train[0].dataset
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        frozen = s.model.backbone.forward_features(x)[:, 0].double()
        prompted = s.prompted_features(x, s.model.prompt[:, 0]).double()
    for stats, feats in ((s.uninstructed, frozen), (s.instructed, prompted)):
        for c in (0, 1):
            torch.testing.assert_close(stats.means()[c], feats[y == c].mean(0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats.covariances()[c], torch.cov(feats[y == c].T),
                                       rtol=1e-4, atol=1e-6)
    assert s.uninstructed.count.dtype == torch.float64
    head_before_tap = []
    real_refine = hide_prompt.refine_on_replay

    def refine(module, *args, **kwargs):
        head_before_tap.append({k: v.clone() for k, v in module.state_dict().items()})
        return real_refine(module, *args, **kwargs)

    monkeypatch.setattr(hide_prompt, "refine_on_replay", refine)
    after1 = _train(s, stream, 1)
    assert torch.equal(after1["prompt"][:, 0], after0["prompt"][:, 0])  # old prompt frozen
    assert not torch.equal(after1["prompt"][:, 1], after0["prompt"][:, 1])
    # TAP: both heads refined on replay of the stored statistics of all 4 seen classes
    assert [(stats, classes) for stats, classes in replayed][:1] == [(s.uninstructed, range(4))]
    assert {id(stats) for stats, _ in replayed} == {id(s.uninstructed), id(s.instructed)}
    assert len(head_before_tap) == 2
    assert not torch.equal(head_before_tap[1]["fc.weight"], s.model.head.fc.weight)
    info = s.task_info()
    assert info["stored_statistic_floats"] == 2 * 4 * (1 + 24 + 24 * 24)
    assert info["trainable_params_this_task"] == s.trainable_parameter_count()
    correct, total = s.evaluate_counts(stream.test[:2])
    info = s.task_info()
    assert info == s.task_info()  # reading it changes nothing
    assert sum(total) > 0 and info["task_identity_accuracy"] is not None


def test_the_two_official_stages_are_clipped_each_on_its_own(monkeypatch):
    """As the official trainers: the prompt + output-head stage and the TII stage each clip their
    own global norm to ``grad_clip`` at every step of the core's loop (one joint clip would leave
    each below it)."""
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=6)
    s = build(HiDePrompt, tiny_vit(dim=24, depth=5), n_tasks=2, epochs=2, batch_size=6,
              prompt_length=2, tii_epochs=2, tap_epochs=1, schedule="constant", grad_clip=1e-4)
    stages = [lambda s: [s.model.prompt, *s.model.head.parameters()],
              lambda s: list(s.model.tii.parameters())]
    norms, real = [], torch.optim.Adam.step

    def step(optimizer, *args, **kwargs):
        norms.append([float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in stage(s)])))
                      for stage in stages])
        return real(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    s.train(stream.train[0])
    norms = torch.tensor(norms)
    assert len(norms) == 4  # 2 epochs × 2 batches
    torch.testing.assert_close(norms, torch.full_like(norms, 1e-4), rtol=1e-3, atol=0)


def test_gaussian_replay_reproduces_the_stored_mean_and_covariance():
    torch.manual_seed(0)
    a = torch.randn(3, 3, dtype=torch.float64)
    feats = torch.randn(500, 3, dtype=torch.float64) @ a + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    stats = ClassStatistics(3)
    stats.update(feats, torch.zeros(500, dtype=torch.long))
    x, y = gaussian_replay(stats, range(1), 40000, torch.Generator().manual_seed(0), jitter=0.0)
    assert torch.all(y == 0)
    torch.testing.assert_close(x.mean(0), stats.means()[0], atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), stats.covariances()[0], atol=0.08, rtol=0.05)


def test_contrastive_regulariser_follows_the_official_formula():
    f, m = torch.randn(5, 8), torch.randn(3, 8)
    stacked = torch.cat([m, f])
    expected = F.cross_entropy(stacked @ stacked.T / 0.8, torch.arange(8))
    torch.testing.assert_close(contrastive_regulariser(f, m), expected)


# ---------------------------------------------------------------------- schedules
# configs/{imr,cifar100,cub}_hideprompt_5e.py argparse defaults (the first --weight-decay, 0.0,
# is the default of dest weight_decay; the later --weight_decay 5e-4 never applies)
OFFICIAL_ARGS = dict(opt="adam", opt_eps=1e-8, opt_betas=(0.9, 0.999), momentum=0.9,
                     weight_decay=0.0, sched="step", warmup_lr=1e-6, min_lr=1e-5, decay_epochs=30.0,
                     warmup_epochs=0, cooldown_epochs=10, patience_epochs=10, decay_rate=0.1,
                     lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0, seed=42)
SCALE = 24 / 256  # args.lr * batch 24 / 256 in both trainers
# training_scripts/train_*_vit.sh: (prompt stage flags, its group lrs), (TII stage flags, its lr)
OFFICIAL_RECIPES = {
    "imagenet-r": (dict(sched="cosine", epochs=150), [0.03 * SCALE, 0.03 * SCALE * 0.1],
                   dict(epochs=20), 0.0005 * SCALE),
    "cifar100": (dict(sched="step", epochs=50), [0.03 * SCALE, 0.03 * SCALE * 0.1],
                 dict(sched="constant", epochs=20), 0.0005 * SCALE),
    # no --larger_prompt_lr in the CUB script: create_optimizer(args, model), one lr for all
    "cub200": (dict(epochs=50), [0.03 * SCALE, 0.03 * SCALE], dict(epochs=20), 0.01 * SCALE),
}


def official_stage_lrs(flags: dict, group_lrs: list[float]) -> list[list[float]]:
    """Every group's lr at every epoch of an official stage: the optimizer built as
    hideprompt_trainer.py / tii_trainer.py build it (timm create_optimizer over the param groups),
    ``create_scheduler(args, optimizer)`` unless ``--sched constant`` (then none), and the engines'
    ``lr_scheduler.step(epoch)`` after each epoch."""
    args = SimpleNamespace(**{**OFFICIAL_ARGS, "lr": group_lrs[0], **flags})
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr,
               "weight_decay": args.weight_decay} for lr in group_lrs]
    optimizer = create_optimizer(args, groups)
    scheduler = create_scheduler(args, optimizer)[0] if args.sched != "constant" else None
    lrs = []
    for epoch in range(args.epochs):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        if scheduler is not None:
            scheduler.step(epoch)
    return lrs


def clbench_lrs(config: HiDePromptConfig, epochs: int) -> list[list[float]]:
    """Every group's lr (prompt, head, TII) at every epoch: the strategy's optimizer and scheduler
    stepped as the core steps it (``scheduler.step()`` after each epoch)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    s = build(HiDePrompt, tiny_vit(dim=24, depth=5), n_tasks=10, **fields)
    s.task, s.known_classes = 0, 0
    s.model.head.grow(2)
    s.before_task(0)
    optimizer = s.make_optimizer_for_task(s.trainable_parameters())
    scheduler = s.make_scheduler_for_task(optimizer)
    lrs = []
    for _ in range(epochs):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        if scheduler is not None:
            scheduler.step()
    return lrs


def recipe(benchmark: str, lr: float | None = None) -> HiDePromptConfig:
    plan = run_plan.RunPlan(run_dir="unused", lr=lr)
    return run_plan.method_config(HiDePrompt, benchmark, 10, plan, [])


@pytest.mark.parametrize("benchmark", sorted(OFFICIAL_RECIPES))
def test_every_group_follows_its_official_timm_schedule(benchmark):
    prompt_flags, prompt_lrs, tii_flags, tii_lr = OFFICIAL_RECIPES[benchmark]
    config = recipe(benchmark)
    ours = clbench_lrs(config, config.epochs)
    prompt_stage = official_stage_lrs(prompt_flags, prompt_lrs)
    tii_stage = official_stage_lrs(tii_flags, [tii_lr])
    assert len(ours) == len(prompt_stage) and config.tii_epochs == len(tii_stage)
    for epoch, (lrs, official) in enumerate(zip(ours, prompt_stage)):
        assert lrs[:2] == pytest.approx(official, rel=1e-12, abs=0), epoch
    for epoch, official in enumerate(tii_stage):  # the TII loss stops after tii_epochs
        assert ours[epoch][2] == pytest.approx(official[0], rel=1e-12, abs=0), epoch
    assert ours[0] == pytest.approx([*prompt_lrs, tii_lr], rel=1e-12, abs=0)


def test_imagenet_r_output_head_decays_to_min_lr_from_its_own_base():
    lrs = clbench_lrs(recipe("imagenet-r"), 150)
    head_base, prompt_base = 0.03 * SCALE * 0.1, 0.03 * SCALE
    # epoch e trains at the value for e - 1: epochs 0 and 1 at the full rate
    assert lrs[0][:2] == lrs[1][:2] == pytest.approx([prompt_base, head_base], rel=1e-12)
    assert lrs[2][0] < prompt_base and lrs[2][1] < head_base
    cosine = 0.5 * (1 + math.cos(math.pi * 148 / 150))
    assert lrs[149][1] == pytest.approx(1e-5 + (head_base - 1e-5) * cosine, rel=1e-9)
    assert lrs[149][1] == pytest.approx(1.0e-5, rel=0.02)  # the official 1.0e-5, not 1.1e-6
    assert lrs[149][0] == pytest.approx(1e-5 + (prompt_base - 1e-5) * cosine, rel=1e-9)
    assert all(lr[2] == pytest.approx(0.0005 * SCALE) for lr in lrs[:20])  # TII: step, ×0.1 at 31


def test_the_core_loop_steps_the_schedules_after_each_epoch():
    class LrSpy(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.lrs = []

        def before_training_epoch(self, strategy, **kwargs):
            self.lrs.append([g["lr"] for g in strategy.optimizer.param_groups])

    spy = LrSpy()
    stream = tensor_stream(n_classes=2, n_tasks=1, train_per_class=2)
    s = build(HiDePrompt, tiny_vit(dim=24, depth=5), plugins=[spy], n_tasks=1, epochs=4, lr=0.01,
              batch_size=4, prompt_length=2, schedule="cosine", min_lr=1e-4, tii_epochs=3,
              tii_lr=0.002, tii_schedule="cosine", tap_epochs=1)
    s.train(stream.train[0])
    prompt_stage = official_stage_lrs(dict(sched="cosine", epochs=4, min_lr=1e-4), [0.01, 0.001])
    tii_stage = official_stage_lrs(dict(sched="cosine", epochs=3, min_lr=1e-4), [0.002])
    assert len(spy.lrs) == 4
    for ours, official in zip(spy.lrs, prompt_stage):
        assert ours[:2] == pytest.approx(official, rel=1e-12)
    assert [lrs[2] for lrs in spy.lrs[:3]] == pytest.approx([lr[0] for lr in tii_stage], rel=1e-12)
    assert spy.lrs[2][0] < spy.lrs[1][0] == spy.lrs[0][0]


def test_a_small_lr_scales_min_lr_so_no_group_rate_ever_rises():
    default = recipe("imagenet-r")
    config = recipe("imagenet-r", lr=1e-6)  # below the unscaled min_lr 1e-5
    assert config.min_lr == pytest.approx(default.min_lr * 1e-6 / default.lr, rel=1e-12)
    lrs = clbench_lrs(config, config.epochs)
    assert lrs[0] == pytest.approx([1e-6, 1e-7, default.tii_lr * 1e-6 / default.lr], rel=1e-12)
    for group in range(3):
        series = [lr[group] for lr in lrs]
        assert all(b <= a for a, b in zip(series, series[1:])), group
    assert lrs[-1][0] < lrs[0][0] and lrs[-1][1] < lrs[0][1]  # and the cosine still decays


# ---------------------------------------------------------------------- prompt layout
def test_official_layout_swaps_the_key_value_and_batch_axes_and_agrees_for_one_image():
    length, dim = 3, 4
    keys, values = torch.randn(5, length, dim), torch.randn(5, length, dim)
    prompts = torch.cat([keys, values], dim=1).unsqueeze(0)  # 1 layer, 5 images, 2L, D
    torch.testing.assert_close(official_layout(prompts[:, :1]), prompts[:, :1], rtol=0, atol=0)
    # training: one prompt for the whole batch of 4; the first half reads the key rows twice,
    # the second half the value rows twice
    shared = prompts[:, :1].expand(-1, 4, -1, -1)
    out = official_layout(shared)[0]
    halves = [(keys, keys), (keys, keys), (values, values), (values, values)]
    for image, (k, v) in enumerate(halves):
        torch.testing.assert_close(out[image], torch.cat([k[0], v[0]]), rtol=0, atol=0)
    # test time: each image its own prompt; image b reads flat rows 2b, 2b+1 of (key/value, image)
    out = official_layout(prompts[:, :2])[0]
    torch.testing.assert_close(out[0], torch.cat([keys[0], keys[1]]), rtol=0, atol=0)
    torch.testing.assert_close(out[1], torch.cat([values[0], values[1]]), rtol=0, atol=0)


def _with_tii_of_several_tasks(s, x):
    """Class rows = each sample's own TII feature, so the batch spans several task identities."""
    own_feature_rows(s, x)
    with torch.no_grad():
        return reference_tii(s, x).argmax(dim=1) // 2


def test_official_layout_at_test_time_matches_the_official_eprompt_reshape():
    s = make(prompt_layout="official")
    intended = make()
    intended.model.load_state_dict(s.model.state_dict())
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5])
    tasks = _with_tii_of_several_tasks(s, x)
    intended.model.tii.load_state_dict(s.model.tii.state_dict())
    assert len(set(tasks.tolist())) > 1
    with torch.no_grad():
        expected = reference_forward(s.model.backbone, x,
                                     official_eprompt(s.model.prompt, tasks.unsqueeze(-1), 3),
                                     s.model.head)
        own = reference_forward(s.model.backbone, x,
                                reference_prefixes(s.model.prompt[:, tasks], 3), s.model.head)
        batch(s, x, y, training=False, task=2)
        batch(intended, x, y, training=False, task=2)
        torch.testing.assert_close(s.forward(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(intended.forward(), own, rtol=1e-5, atol=1e-5)
    assert (expected - own).abs().max() > 1e-2  # the two layouts differ for batch > 1


def test_official_layout_in_training_matches_the_official_eprompt_with_momentum():
    s = make(prompt_layout="official", prompt_momentum=0.3)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([4, 5, 4, 5])
    s.known_classes, s._old_means = 4, torch.randn(4, 24)
    batch(s, x, y, training=True, task=2)
    logits = s.forward()
    with torch.no_grad():
        idx = torch.full((4, 1), 2)  # prompt_mask: the task's prompt for every image
        prefixes = official_eprompt(s.model.prompt, idx, 3, task=2, momentum=0.3)
        expected = reference_forward(s.model.backbone, x, prefixes, s.model.head)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    logits.sum().backward()  # gradients reach the current prompt through the reshape
    assert torch.all(s.model.prompt.grad[:, :2] == 0) and s.model.prompt.grad[:, 2].abs().sum() > 0


@pytest.mark.parametrize("training", [True, False])
def test_layouts_agree_for_one_image_and_differ_for_more(training):
    official, intended = make(prompt_layout="official"), make()
    intended.model.load_state_dict(official.model.state_dict())
    y = torch.tensor([4, 5, 4, 5]) if training else torch.arange(6)  # six TII classes
    x = torch.rand(len(y), 3, 16, 16)
    if not training:
        assert len(set(_with_tii_of_several_tasks(official, x).tolist())) > 1
        intended.model.tii.load_state_dict(official.model.tii.state_dict())
    outputs = {}
    with torch.no_grad():
        for name, s in (("official", official), ("intended", intended)):
            s.known_classes, s._old_means = 4, torch.randn(4, 24)
            batch(s, x[:1], y[:1], training=training, task=2)
            one = s.forward()
            batch(s, x, y, training=training, task=2)
            outputs[name] = (one, s.forward())
    torch.testing.assert_close(outputs["official"][0], outputs["intended"][0], rtol=1e-6, atol=1e-6)
    assert (outputs["official"][1] - outputs["intended"][1]).abs().max() > 1e-2


def test_config_rejects_unknown_layouts_and_tii_schedules():
    with pytest.raises(UsageError, match="prompt_layout"):
        HiDePromptConfig(prompt_layout="permuted")
    with pytest.raises(UsageError, match="tii_schedule"):
        HiDePromptConfig(tii_schedule="linear")
    with pytest.raises(UsageError, match="decay_epochs"):
        HiDePromptConfig(decay_epochs=0)


def test_checkpoint_resume_restores_prompts_heads_and_statistics():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    config = dict(epochs=1, batch_size=8, prompt_length=2, tap_epochs=1, schedule="constant")
    s = build(HiDePrompt, tiny_vit(dim=24, depth=5), n_tasks=2, **config)
    s.train(stream.train[0])
    s.train(stream.train[1])
    fresh = build(HiDePrompt, tiny_vit(dim=24, depth=5), n_tasks=2, **config)
    fresh.load_checkpoint(s.checkpoint())
    assert fresh.class_task == s.class_task == [0, 0, 1, 1]
    for name in ("uninstructed", "instructed"):
        for key, value in getattr(s, name).state_dict().items():
            assert torch.equal(getattr(fresh, name).state_dict()[key], value), (name, key)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    outputs = []
    for strategy in (s, fresh):
        strategy.model.eval()
        batch(strategy, x, y, training=False, task=1)
        with torch.no_grad():
            outputs.append(strategy.forward())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_training_step_runs_under_bf16_autocast_with_the_regulariser_in_float32():
    s = make(prompt_momentum=0.1)
    s.known_classes, s._old_means = 4, torch.randn(4, 24)
    batch(s, torch.rand(4, 3, 16, 16), torch.tensor([4, 5, 4, 5]), training=True, task=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s.mb_output = s.forward()
        loss = s.criterion()
        regulariser = contrastive_regulariser(s._features, s._old_means)
    assert s.mb_output.dtype == torch.bfloat16 and regulariser.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(s.model.prompt.grad).all() and s.model.prompt.grad[:, 2].abs().sum() > 0
