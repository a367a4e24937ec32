"""SLCA (methods/slow_learner): the slow learner's two learning rates against the official
``_stage1_training`` (models/slca.py), the classifier alignment step against the official
``_stage2_compact_classifier`` on identical statistics and random draws, the pre-alignment head
recalled for the next task, the reset final norm, checkpoints of the whole backbone, bf16, and
the end-to-end run on digits with a kill/resume."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import (Killed, build, digits_results, kill_after_task, tensor_stream,
                     tiny_vit)
from torch import nn
from torch.distributions import MultivariateNormal
from torch.nn import functional as F

from clbench import runner
from clbench.methods.slow_learner import base as slow_base
from clbench.methods.slow_learner.slca import SLCA
from clbench.plan import RunPlan

DIM = 24


def two_task_strategy(**config):
    """SLCA after a finished first task of 2 classes, about to train the second (2 classes)."""
    s = build(SLCA, tiny_vit(dim=DIM), n_tasks=3, **{"epochs": 3, "milestones": [1],
                                                     "batch_size": 4, **config})
    s.model.head.grow(2)
    s.task, s.known_classes = 1, 2
    s.model.head.grow(2)
    s.before_task(1)
    return s


def official_groups(backbone, new_head, lrate, bcb_lrscale, weight_decay):
    """``_stage1_training``: the whole backbone at lrate·bcb_lrscale, the current head at lrate,
    both with weight decay, SGD momentum 0.9."""
    return torch.optim.SGD([
        {"params": list(backbone.parameters()), "lr": lrate * bcb_lrscale, "weight_decay": weight_decay},
        {"params": list(new_head.parameters()), "lr": lrate, "weight_decay": weight_decay}],
        lr=lrate, momentum=0.9, weight_decay=weight_decay)


@pytest.mark.parametrize("weight_decay", [5e-4, 0.5])
def test_two_learning_rates_and_their_schedule_match_the_official_stage(weight_decay):
    """Three SGD steps across a milestone: the backbone (every weight) and the head rows equal
    the official network's (frozen old head, new per-task head, MultiStepLR per epoch); the large
    decay makes the current head's decay visible above the tolerance."""
    s = two_task_strategy(weight_decay=weight_decay)
    cfg = s.config
    backbone = copy.deepcopy(s.model.backbone)
    fc = s.model.head.fc
    old_head, new_head = nn.Linear(DIM, 2), nn.Linear(DIM, 2)
    with torch.no_grad():
        old_head.weight.copy_(fc.weight[:2]), old_head.bias.copy_(fc.bias[:2])
        new_head.weight.copy_(fc.weight[2:]), new_head.bias.copy_(fc.bias[2:])
    old_head.requires_grad_(False)
    optimizer = s.make_optimizer_for_task(s.trainable_parameters())
    scheduler = s.make_scheduler_for_task(optimizer)
    reference = official_groups(backbone, new_head, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay)
    ref_scheduler = torch.optim.lr_scheduler.MultiStepLR(reference, milestones=[1], gamma=0.1)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-2], rel=1e-12)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == \
        {id(p) for p in s.model.backbone.parameters()}
    g = torch.Generator().manual_seed(0)
    for epoch in range(3):
        x = torch.rand(4, 3, 16, 16, generator=g)
        y = torch.tensor([2, 3, 3, 2])
        s.is_training, s.mbatch = True, [x, y, torch.ones(4, dtype=torch.long)]
        s.mb_output = s.model(x)
        loss = s.criterion()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        features = backbone(x)
        logits = torch.cat([old_head(features), new_head(features)], 1)
        ref_loss = F.cross_entropy(logits[:, 2:], y - 2)
        reference.zero_grad()
        ref_loss.backward()
        reference.step()
        scheduler.step()
        ref_scheduler.step()
        assert [g["lr"] for g in optimizer.param_groups] == \
            pytest.approx([g["lr"] for g in reference.param_groups], rel=1e-12)
    for (name, p), q in zip(s.model.backbone.named_parameters(), backbone.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(fc.weight[2:], new_head.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fc.bias[2:], new_head.bias, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fc.weight[:2], old_head.weight, rtol=0, atol=0)  # old head frozen
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)  # the milestone was applied


def official_stage2(fc, means, covs, task, task_size, task_sizes, lrate, weight_decay, epochs,
                    temperature, per_class=256):
    """``_stage2_compact_classifier`` (models/slca.py), in our words: per epoch and class c of
    task t_c = c // task_size, 256 samples of N(μ_c·(0.9 + (t_c+1)/(task+1)·0.1), Σ_c), one CPU
    shuffle, one batch of 256 per class; logits over the per-task mean logit norm and the
    temperature; SGD (lrate, momentum 0.9, weight decay) under CosineAnnealingLR(T_max=epochs)."""
    optimizer = torch.optim.SGD(fc.parameters(), lr=lrate, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    n = len(means)
    for _ in range(epochs):
        data, labels = [], []
        for c in range(n):
            decay = (c // task_size + 1) / (task + 1) * 0.1
            mean = means[c].double() * (0.9 + decay)
            data.append(MultivariateNormal(mean.float(), covs[c].float()).sample((per_class,)))
            labels += [c] * per_class
        x, y = torch.cat(data).float(), torch.tensor(labels)
        order = torch.randperm(len(y))
        x, y = x[order], y[order]
        for i in range(n):
            logits = fc(x[i * per_class:(i + 1) * per_class])
            norms, start = [], 0
            for size in task_sizes:
                norms.append(logits[:, start:start + size].norm(p=2, dim=-1, keepdim=True) + 1e-7)
                start += size
            logits = logits / torch.cat(norms, -1).mean(-1, keepdim=True) / temperature
            loss = F.cross_entropy(logits, y[i * per_class:(i + 1) * per_class])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()


def test_alignment_step_matches_the_official_stage_and_touches_only_the_head(monkeypatch):
    """Task 3 of 3 (2 classes each): the Gaussians are the test-transform features' mean and
    unbiased covariance + 1e-4·I, and the head after alignment (one epoch, seeded) equals the
    official stage's from the same statistics, head and random state; the backbone is untouched."""
    stream = tensor_stream(n_classes=6, n_tasks=3, train_per_class=6)
    s = build(SLCA, tiny_vit(dim=DIM), n_tasks=3, epochs=1, batch_size=6, ca_epochs=1)
    seen = {}
    real_align = slow_base.align_classifier

    def recording(head, gaussians, task, options, device):
        seen.update(head=copy.deepcopy(head.fc), rng=torch.get_rng_state(), task=task,
                    backbone={k: v.clone() for k, v in s.model.backbone.state_dict().items()})
        real_align(head, gaussians, task, options, device)

    monkeypatch.setattr(slow_base, "align_classifier", recording)
    for t in range(3):
        s.train(stream.train[t])
    assert seen["task"] == 2 and s.task_info() == {"aligned_classes": 6}
    data = stream.train[2].dataset
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    s.model.eval()
    with torch.no_grad():
        feats = s.model.features(images).double()
    for c in (4, 5):
        torch.testing.assert_close(s.gaussians.means[c], feats[labels == c].mean(0), rtol=1e-5, atol=1e-6)
        cov = torch.cov(feats[labels == c].T) + 1e-4 * torch.eye(DIM, dtype=torch.float64)
        torch.testing.assert_close(s.gaussians.covs[c], cov.float(), rtol=1e-4, atol=1e-6)
    reference = seen["head"]
    torch.set_rng_state(seen["rng"])
    official_stage2(reference, s.gaussians.means, s.gaussians.covs, 2, 2, [2, 2, 2], 0.01, 5e-4,
                    epochs=1, temperature=0.1)
    fc = s.model.head.fc
    torch.testing.assert_close(fc.weight, reference.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fc.bias, reference.bias, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fc.weight, s.head_before_alignment["weight"])  # it did move
    for key, value in s.model.backbone.state_dict().items():
        assert torch.equal(value, seen["backbone"][key]), key


def test_next_task_trains_from_the_head_before_alignment():
    s = build(SLCA, tiny_vit(dim=DIM), n_tasks=3, epochs=1, ca_epochs=1)
    s.model.head.grow(4)
    s.task, s.known_classes = 1, 2
    s.gaussians.means = torch.randn(4, DIM, dtype=torch.float64)
    s.gaussians.covs = torch.eye(DIM).repeat(4, 1, 1)
    s.gaussians.class_task = [0, 0, 1, 1]
    s.add_class_statistics = lambda task: None  # statistics set above
    s.after_task(1)
    aligned = s.model.head.fc.weight.detach().clone()
    before = s.head_before_alignment["weight"]
    assert not torch.allclose(aligned, before)
    s.known_classes = 4
    s.model.head.grow(2)
    s.before_task(2)
    fc = s.model.head.fc
    assert torch.equal(fc.weight[:4], before) and torch.equal(fc.bias[:4], s.head_before_alignment["bias"])
    assert fc.weight[4:].abs().max() < 0.1 and torch.equal(fc.bias[4:], torch.zeros(2))
    keep = build(SLCA, tiny_vit(dim=DIM), n_tasks=3, recall_head=False)
    keep.model.head.grow(4)
    with torch.no_grad():
        keep.model.head.fc.weight.copy_(aligned)
    keep.head_before_alignment = {"weight": before, "bias": torch.zeros(4)}
    keep.known_classes = 4
    keep.model.head.grow(2)
    keep.before_task(2)
    assert torch.equal(keep.model.head.fc.weight[:4], aligned)


def pretrained_like_vit():
    vit = tiny_vit(dim=DIM)
    with torch.no_grad():
        vit.norm.weight.normal_(1.0, 0.1), vit.norm.bias.normal_(0.0, 0.1)
    return vit


def test_whole_backbone_trains_from_a_reset_final_norm():
    s = build(SLCA, pretrained_like_vit())
    norm = s.model.backbone.norm
    assert torch.equal(norm.weight, torch.ones(DIM)) and torch.equal(norm.bias, torch.zeros(DIM))
    assert all(p.requires_grad for p in s.model.backbone.parameters())
    saved = s.checkpoint()["model"]  # the reset norm differs from the pretrained one: stored
    assert "backbone.norm.weight" in saved and "backbone.blocks.0.attn.qkv.weight" not in saved
    vit = pretrained_like_vit()
    expected = vit.norm.weight.detach().clone()
    kept = build(SLCA, vit, reset_final_norm=False)
    assert torch.equal(kept.model.backbone.norm.weight, expected)


def test_training_step_runs_under_bf16_autocast():
    s = two_task_strategy()
    x = torch.rand(4, 3, 16, 16)
    s.is_training, s.mbatch = True, [x, torch.tensor([2, 3, 2, 3]), torch.ones(4, dtype=torch.long)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s.mb_output = s.model(x)
        loss = s.criterion()
    loss.backward()
    assert s.mb_output.dtype == torch.bfloat16 and torch.isfinite(loss)
    grads = [p.grad for p in s.model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------- end to end on digits
@pytest.mark.slow
def test_digits_forgets_less_than_finetune_and_resumes_identically(tmp_path, monkeypatch):
    """slca, slca-pp and finetune on digits (1 epoch): both slow learners forget less and end
    higher; each killed after task 2 and resumed gives the same counts and checkpoint, and slca's
    checkpoint stores every backbone weight (all of them trained)."""
    plan = lambda name, names: RunPlan(run_dir=str(tmp_path / name), methods=names,  # noqa: E731
                                       epochs=1)
    methods = ["slca", "slca-pp"]
    runner.run(plan("full", [*methods, "finetune"]), log=lambda *_: None)
    full = {m: digits_results(tmp_path / "full", m) for m in [*methods, "finetune"]}
    for method in methods:
        assert full[method]["metrics"]["forgetting"] < full["finetune"]["metrics"]["forgetting"]
        assert full[method]["metrics"]["final_acc"] > full["finetune"]["metrics"]["final_acc"]
        assert [i["aligned_classes"] for i in full[method]["method_info"]] == [0, 4, 6, 8, 10]
    killed = kill_after_task(monkeypatch)  # each method once, right after task 2
    for _ in methods:
        with pytest.raises(Killed):
            runner.run(plan("resumed", methods), log=lambda *_: None)
    logs = []
    runner.run(plan("resumed", methods), log=logs.append)
    assert [Path(job).parts[-2] for job in killed] == methods
    assert any("resuming after task 2" in line for line in logs), logs
    backbone_keys = {f"backbone.{k}" for k in tiny_vit(dim=96, depth=4).state_dict()}
    for method in methods:
        resumed = digits_results(tmp_path / "resumed", method)
        assert resumed["complete"] and resumed["correct"] == full[method]["correct"], method
        ckpt = [torch.load(tmp_path / d / f"digits-5tasks/{method}/seed-1993/checkpoint.pt",
                           weights_only=True) for d in ("full", "resumed")]
        if method == "slca":
            assert backbone_keys <= set(ckpt[0]["model"])
        for key, value in ckpt[0]["model"].items():
            assert torch.equal(value, ckpt[1]["model"][key]), (method, key)
