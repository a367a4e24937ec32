"""HiDe-Prompt: parity with a reference written from the official thu-ml/HiDe-Prompt code (task
identity from the original model's MLP head, prefix prompts, prompt momentum, contrastive
regulariser), statistics, frozen old prompts and Gaussian replay from stored statistics only."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from clbench.class_stats import ClassStatistics
from clbench.methods import hide_prompt
from clbench.methods.hide_prompt import (HiDePrompt, contrastive_regulariser, gaussian_replay,
                                         timm_epoch_factor)
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
    """peft/prompt/hide_prompt.py EPrompt with prefix tuning: prompt (layers, 2, pool, L, D) —
    here stored as (layers, pool, 2L, D) — per sample [:, :, idx]; dual index 0 keys, 1 values."""
    return {layer: (prompt[layer][..., :length, :], prompt[layer][..., length:, :])
            for layer in range(prompt.shape[0])}


def test_inference_matches_the_official_uninstructed_then_prompted_passes():
    s = make()
    x = torch.rand(6, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():  # class rows = each sample's own TII feature: several task identities
        t = s.model.tii
        f = s.model.backbone.forward_features(x)[:, 0]
        h = t.norm(f + t.fc2(F.gelu(t.fc1(f))))
        t.head.fc.weight.copy_(h - h.mean(0))  # logits (h_i - m)·(h_j - m)
        t.head.fc.bias.copy_(-(h.mean(0) * (h - h.mean(0))).sum(1))
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


def test_task_identity_depends_on_the_frozen_features_only():
    s = make()
    x = torch.rand(8, 3, 16, 16)
    query = s.model.backbone.forward_features(x)[:, 0]
    before = s.predicted_tasks(query)
    with torch.no_grad():
        s.model.prompt.normal_()  # prompts play no part in task identity
        s.model.head.fc.weight.normal_()
    torch.testing.assert_close(s.predicted_tasks(query), before, rtol=0, atol=0)
    torch.testing.assert_close(before, reference_tii(s, x).argmax(1) // 2, rtol=0, atol=0)


def _train(s, stream, task):
    s.train(stream.train[task])
    return {k: v.detach().clone() for k, v in s.model.state_dict().items() if not k.startswith("backbone.")}


def test_statistics_old_prompts_and_replay_over_two_tasks(monkeypatch):
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=6)
    s = build(HiDePrompt, tiny_vit(dim=24, depth=5), n_tasks=2, epochs=2, batch_size=6, lr=0.01,
              prompt_length=2, tap_epochs=2, tii_epochs=1, schedule="constant")
    replayed = []
    real = hide_prompt.gaussian_replay

    def spy(stats, classes, per_class, generator, jitter=1e-4):
        replayed.append((stats, classes))
        return real(stats, classes, per_class, generator, jitter)

    monkeypatch.setattr(hide_prompt, "gaussian_replay", spy)
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


def test_contrastive_regulariser_and_schedules_follow_the_official_formulas():
    f, m = torch.randn(5, 8), torch.randn(3, 8)
    stacked = torch.cat([m, f])
    expected = F.cross_entropy(stacked @ stacked.T / 0.8, torch.arange(8))
    torch.testing.assert_close(contrastive_regulariser(f, m), expected)
    # timm schedulers stepped with the finished epoch: epochs 0 and 1 at full rate
    lr = 0.0028125
    cos = [timm_epoch_factor("cosine", e, 150, lr, 1e-5, 30) for e in range(150)]
    assert cos[0] == cos[1] == 1.0 and cos[2] < 1.0
    assert cos[-1] * lr == pytest.approx(1e-5 + 0.5 * (lr - 1e-5) * (1 + math.cos(math.pi * 148 / 150)))
    step = [timm_epoch_factor("step", e, 50, lr, 1e-5, 30) for e in range(50)]
    assert step[30] == 1.0 and step[31] == pytest.approx(0.1)


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
