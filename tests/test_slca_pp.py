"""SLCA++ (methods/slow_learner/slca_pp.py) against the official models/slca_pp.py and
convs/vits.py, rewritten here: the hybrid slow learner's trainable set and LoRA (init, formula,
merge), the four learning-rate groups and their cosine, the symmetric cross-entropy, the
alignment samples (unshrunk means, age-scaled samples) and the inference feature scales."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import build, tensor_stream, tiny_vit
from torch import nn
from torch.distributions import MultivariateNormal
from torch.nn import functional as F

from clbench.adapters import merged
from clbench.methods.slow_learner.slca_pp import LoRALinear, SLCApp, symmetric_cross_entropy

DIM = 24


def make(**config):
    return build(SLCApp, tiny_vit(dim=DIM), n_tasks=3, **{"epochs": 4, "milestones": [3], **config})


def test_hybrid_slow_learner_trains_lora_norms_biases_and_cls_token():
    s = make()
    vit = s.model.backbone
    loras = [m for m in vit.modules() if isinstance(m, LoRALinear)]
    assert len(loras) == 3 * len(vit.blocks) and all(isinstance(b.mlp.fc2, LoRALinear) for b in vit.blocks)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    expected = {n for n, _ in vit.named_parameters()
                if any(k in n for k in ("norm", "bias", "cls_token", "lora_"))}
    assert trainable == expected
    assert "pos_embed" not in trainable and "patch_embed.proj.weight" not in trainable
    assert not any(n.endswith("base.weight") for n in trainable)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        before = s.model.features(x)
    s.before_task(0)
    for lora in loras:  # A: top-4 right singular vectors of the pretrained weight, B zero
        vh = torch.linalg.svd(lora.base.weight)[2]
        torch.testing.assert_close(lora.lora_A, vh[:4])
        assert torch.equal(lora.lora_B, torch.zeros_like(lora.lora_B))
    with torch.no_grad():  # the LoRA starts as the identity
        torch.testing.assert_close(s.model.features(x), before)


def test_lora_linear_is_the_official_formula_and_merges_exactly():
    base = nn.Linear(8, 12)
    lora = LoRALinear(base, rank=4, scale=0.8)
    with torch.no_grad():
        lora.lora_A.normal_(), lora.lora_B.normal_()
    x = torch.randn(5, 8)
    official = F.linear(x, torch.matmul(lora.lora_B, lora.lora_A) * 0.8 + base.weight, bias=base.bias)
    torch.testing.assert_close(lora(x), official)
    with merged(lora), torch.no_grad():
        assert lora.merged
        torch.testing.assert_close(lora(x), official)
    assert not lora.merged


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
@pytest.mark.parametrize("task", [0, 1])
def test_learning_rate_groups_and_cosine_match_the_official_stage(task):
    """[lora_A, lora_B, other backbone, head]: LoRA at lrate·0.5 in the first task and
    lrate·bcb_lrscale later, CosineAnnealingLR(T_max=epochs, eta_min=lrate·bcb·0.1^len(milestones))."""
    s = make()
    s.task = task
    s.model.head.grow(2)
    optimizer = s.make_optimizer_for_task(s.trainable_parameters())
    scheduler = s.make_scheduler_for_task(optimizer)
    named = dict(s.model.backbone.named_parameters())
    groups = [[n for n, p in named.items() if any(p is q for q in g["params"])]
              for g in optimizer.param_groups[:3]]
    assert all("lora_A" in n for n in groups[0]) and all("lora_B" in n for n in groups[1])
    assert len(groups[0]) == len(groups[1]) == 6
    assert not any("lora" in n for n in groups[2]) and "cls_token" in groups[2]
    lrate, bcb = 0.01, 0.1
    lora_lr = lrate * (0.5 if task == 0 else bcb)
    reference = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr}
                                 for lr in (lora_lr, lora_lr, lrate * bcb, lrate)], lr=lrate, momentum=0.9)
    ref_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=4,
                                                               eta_min=lrate * bcb * 0.1 ** 1)
    for _ in range(4):
        assert [g["lr"] for g in optimizer.param_groups] == \
            pytest.approx([g["lr"] for g in reference.param_groups], rel=1e-12)
        scheduler.step()
        ref_scheduler.step()
    assert {g["weight_decay"] for g in optimizer.param_groups[:3]} == {0.0}  # imgnetr config
    assert optimizer.param_groups[3]["lr"] < lrate  # the head is annealed too


def official_sce(logits, targets, a, b):
    """``SLCApp._run``'s loss, in our words."""
    ce = F.cross_entropy(logits, targets)
    pred = torch.clamp(F.softmax(logits, dim=1), min=1e-7, max=1.0)
    one_hot = torch.clamp(F.one_hot(targets, pred.size(1)).float(), min=1e-4, max=1.0)
    rce = -1 * torch.sum(pred * torch.log(one_hot), dim=1)
    return a * ce + b * rce.mean()


def test_symmetric_cross_entropy_matches_the_official_loss_and_is_the_training_loss():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 4, generator=g)).requires_grad_()
    targets = torch.tensor([0, 1, 2, 3, 1, 0])
    ours = symmetric_cross_entropy(logits, targets, 1.0, 0.1)
    (grad,) = torch.autograd.grad(ours, logits)
    reference = official_sce(logits, targets, 1.0, 0.1)
    (ref_grad,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad, ref_grad)
    assert not torch.allclose(ours, F.cross_entropy(logits, targets))
    s = make(weight_decay=0.0)
    s.model.head.grow(4)
    s.known_classes, s.is_training = 2, True
    s.mbatch = [torch.rand(3, 3, 16, 16), torch.tensor([2, 3, 3]), torch.ones(3, dtype=torch.long)]
    s.mb_output = s.model(s.mb_x)
    torch.testing.assert_close(s.criterion(), official_sce(s.mb_output[:, 2:], s.mb_y - 2, 0.5, 0.5))


def official_stage2(fc, means, covs, cur_task, task_size, mu, lrate, weight_decay, epochs,
                    temperature, per_class=256):
    """``SLCApp._stage2_compact_classifier`` in our words: per class, 256 samples of N(μ_c, Σ_c),
    then each scaled by 1/(1 + r·(cur_task − t_c)), r = μ + 0.02·(U − 0.5); the rest as SLCA."""
    optimizer = torch.optim.SGD(fc.parameters(), lr=lrate, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    n = len(means)
    for _ in range(epochs):
        data, labels = [], []
        for c in range(n):
            t_id = c // task_size
            x = MultivariateNormal(means[c].double().float(), covs[c].float()).sample((per_class,))
            r = mu + 0.02 * (torch.rand(x.size(0)) - 0.5)
            data.append((1 / (1 + r * (cur_task - t_id))).unsqueeze(1) * x)
            labels += [c] * per_class
        x, y = torch.cat(data), torch.tensor(labels)
        order = torch.randperm(len(y))
        x, y = x[order], y[order]
        for i in range(n):
            logits = fc(x[i * per_class:(i + 1) * per_class])
            norms = torch.cat([logits[:, k:k + task_size].norm(p=2, dim=-1, keepdim=True) + 1e-7
                               for k in range(0, n, task_size)], -1)
            logits = logits / norms.mean(-1, keepdim=True) / temperature
            loss = F.cross_entropy(logits, y[i * per_class:(i + 1) * per_class])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()


def aligned_strategy(**config):
    """SLCA++ after task 3 of 3 (2 classes each) with random statistics, aligned (seeded)."""
    s = make(ca_epochs=1, **config)
    g = torch.Generator().manual_seed(3)
    s.model.head.grow(6)
    with torch.no_grad():
        s.model.head.fc.weight.normal_(generator=g)
    s.task, s.known_classes = 2, 4
    s.gaussians.means = 2 * torch.randn(6, DIM, dtype=torch.float64, generator=g)
    a = torch.randn(6, DIM, DIM, generator=g)
    s.gaussians.covs = a @ a.transpose(1, 2) / DIM + 0.1 * torch.eye(DIM)
    s.gaussians.class_task = [0, 0, 1, 1, 2, 2]
    s.add_class_statistics = lambda task: None  # statistics set above
    start = copy.deepcopy(s.model.head.fc)
    torch.manual_seed(7)
    s.after_task(2)
    return s, start


def test_alignment_samples_unshrunk_means_scaled_by_age():
    s, start = aligned_strategy(ca_weight_decay=5e-4)
    torch.manual_seed(7)
    official_stage2(start, s.gaussians.means, s.gaussians.covs, 2, 2, 0.02, 0.01, 5e-4, epochs=1,
                    temperature=0.1)
    torch.testing.assert_close(s.model.head.fc.weight, start.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.model.head.fc.bias, start.bias, rtol=1e-5, atol=1e-6)


def test_inference_scales_the_features_of_older_heads():
    """Evaluation: task t's rows see the features ×(1 + μ·(2 − t)) (official ``update_scale``);
    training sees them unscaled."""
    s, _ = aligned_strategy()
    x = torch.rand(4, 3, 16, 16)
    s.mbatch = [x, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)]
    fc = s.model.head.fc
    with torch.no_grad():
        features = s.model.features(x)
        expected = torch.cat([F.linear(features * (1 + 0.02 * (2 - t)), fc.weight[2 * t:2 * t + 2],
                                       fc.bias[2 * t:2 * t + 2]) for t in range(3)], 1)
        s.is_training = False
        torch.testing.assert_close(s.forward(), expected)
        s.is_training = True
        torch.testing.assert_close(s.forward(), fc(features))


def test_training_step_runs_under_bf16_autocast():
    s = make()
    s.before_task(0)
    s.model.head.grow(2)
    s.is_training = True
    s.mbatch = [torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 1, 0]), torch.zeros(4, dtype=torch.long)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s.mb_output = s.forward()
        loss = s.criterion()
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loras = [m for m in s.model.backbone.modules() if isinstance(m, LoRALinear)]
    assert all(torch.isfinite(m.lora_B.grad).all() and m.lora_B.grad.abs().sum() > 0 for m in loras)


def test_checkpoint_round_trip_restores_lora_statistics_and_recall_head():
    """Two tasks trained, checkpointed, loaded into a fresh strategy: the same predictions,
    Gaussians and pre-alignment head, and the third task starts identically."""
    stream = tensor_stream(n_classes=6, n_tasks=3, train_per_class=4)
    s = make(epochs=1, batch_size=6, ca_epochs=1)
    for t in range(2):
        s.train(stream.train[t])
    fresh = make(epochs=1, batch_size=6, ca_epochs=1)
    fresh.load_checkpoint(s.checkpoint())
    x = torch.rand(3, 3, 16, 16)

    @torch.no_grad()
    def predict(strategy):
        strategy.is_training = False
        strategy.mbatch = [x, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)]
        return strategy.forward()

    torch.testing.assert_close(predict(fresh), predict(s), rtol=0, atol=0)
    assert fresh.gaussians.class_task == s.gaussians.class_task == [0, 0, 1, 1]
    assert torch.equal(fresh.gaussians.covs, s.gaussians.covs)
    assert torch.equal(fresh.head_before_alignment["weight"], s.head_before_alignment["weight"])
    assert any(m.lora_B.abs().sum() > 0 for m in fresh.model.backbone.modules()
               if isinstance(m, LoRALinear))
    for strategy in (s, fresh):
        torch.manual_seed(9)
        strategy.train(stream.train[2])
    torch.testing.assert_close(predict(fresh), predict(s), rtol=0, atol=0)
