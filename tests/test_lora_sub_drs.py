"""LoRA-Sub-DRS: parity with a reference written from the official code as public forks keep it
(``models/vit_lora.py`` Attention_LoRA's three weight modes and the ``get_cur_x`` input matrix,
``utils/losses.py`` AugmentedTripletLoss, ``optimgrad/adam_proj.py`` with ``get_transforms``,
``init_param``, ``_build_protos`` and NCM inference; the same maths as LibContinual's port) on
identical random weights in float64, and the drift-resistant-space invariant."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import build, tensor_stream, tiny_vit
from torch.nn import functional as F

from clbench.errors import UsageError
from clbench.methods.lora.lora_sub_drs import LoRASubDRS, LoRASubDRSConfig, augmented_triplet_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def make(n_tasks=2, **config):
    return build(LoRASubDRS, tiny_vit(depth=2).double(), n_tasks=n_tasks,
                 **{"epochs": 1, "batch_size": 8, "rank": 3, "lr": 1e-2, "head_lr": 2e-2,
                    "margin": 1.0, "triplet_weight": 0.3, "share": 0.9, **config})


def start_task(s, experience, batches):
    s.experience = experience
    s.dataloader = batches
    s.check_model_and_optimizer()
    s.is_training = True
    s.model.train()


def randomise(s, scale=0.2):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in s.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for a in s.adapters:
            a.old_delta.copy_(torch.randn(a.old_delta.shape, generator=g) * scale / 4)


# ----------------------------------------------------------------- the reference (official maths)
def ref_features(s, x, mode, record=None):
    """The ViT with MultiHeadAttention_LoRA_Sub: ``train`` W + prev + B A, ``test`` W + prev,
    ``input`` W − prev (and the running mean of xᵀx per layer into ``record``)."""
    vit = s.model.backbone
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for i, block in enumerate(vit.blocks):
        a = block.attn.qkv
        d = a.dim
        wq, wk, wv = a.qkv.weight[:d], a.qkv.weight[d:2 * d], a.qkv.weight[2 * d:]
        if mode == "input":
            wk, wv = wk - a.old_delta[0], wv - a.old_delta[1]
        else:
            wk, wv = wk + a.old_delta[0], wv + a.old_delta[1]
            if mode == "train":
                wk, wv = wk + a.up_k @ a.down_k, wv + a.up_v @ a.down_v
        z = block.norm1(h)
        if record is not None:
            total, n = record.get(i, (torch.zeros(d, d), 0))
            batch = torch.bmm(z.permute(0, 2, 1), z).sum(0)
            record[i] = ((total * n + batch) / (n + z.shape[0] * z.shape[1]), n + z.shape[0] * z.shape[1])
        qkv = F.linear(z, torch.cat([wq, wk, wv]), a.qkv.bias)
        heads = block.attn.num_heads
        q, k, v = qkv.reshape(z.shape[0], z.shape[1], 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(-1)
        h = h + block.attn.proj((attn @ v).transpose(1, 2).reshape(z.shape))
        h = h + block.mlp(block.norm2(h))
    return vit.norm(h)[:, 0]


def ref_triplet(inputs, targets, center, margin):
    """AugmentedTripletLoss.forward, loop for loop."""
    n = inputs.size(0)
    dist = torch.pow(inputs, 2).sum(dim=1, keepdim=True).expand(n, n)
    dist = (dist + dist.t()).addmm(inputs, inputs.t(), beta=1, alpha=-2).clamp(min=1e-12).sqrt()
    mask = targets.expand(n, n).eq(targets.expand(n, n).t())
    ap, an = [], []
    for i in range(n):
        ap.append(dist[i][mask[i]].max())
        negatives = dist[i][mask[i] == 0]
        an.append(dist[i][mask[i]].max() + margin if negatives.numel() == 0 else negatives.min())
    center = center / center.norm(dim=1, keepdim=True)
    for i in range(n):
        for j in range(len(center)):
            an[i] = torch.minimum(an[i], torch.norm(inputs[i] - center[j]).clamp(min=1e-12))
    return F.margin_ranking_loss(torch.stack(an), torch.stack(ap), torch.ones(n), margin=margin)


# ----------------------------------------------------------------- parity
def test_three_weight_modes_and_the_loss_match_the_official_code(float64):
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    s = make()
    start_task(s, stream.train[0], [])
    randomise(s)
    x = torch.rand(6, 3, 16, 16)
    torch.testing.assert_close(s.model.features(x), ref_features(s, x, "train"), rtol=1e-10, atol=1e-10)
    for a in s.adapters:
        a.subtracted = True
    torch.testing.assert_close(s.model.features(x), ref_features(s, x, "input"), rtol=1e-10, atol=1e-10)
    for a in s.adapters:
        a.subtracted = False
    # the loss of one step of task 1 (old prototypes as extra negatives)
    s._prototypes = torch.randn(2, s.model.head.in_features)
    s.known_classes = 2
    s.model.head.grow(2)
    y = torch.tensor([2, 3, 2, 2, 3, 3])
    s.mbatch = [x, y, torch.ones_like(y)]
    s.mb_output = s.forward()
    loss = s.criterion()
    f = ref_features(s, x, "train")
    fc = s.model.head.fc
    expected = F.cross_entropy(F.linear(f, fc.weight[2:], fc.bias[2:]), y - 2) + 0.3 * ref_triplet(
        f / f.norm(dim=-1, keepdim=True), y - 2, s._prototypes, 1.0)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-8)


def test_triplet_loss_of_a_one_class_batch_matches_the_official_code():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(4, 8), dim=1)
    y = torch.zeros(4, dtype=torch.long)
    far = -f[:1] * 3  # an old prototype beyond the hardest positive + margin of anchor 0
    for prototypes in (torch.zeros(0, 8), far):
        loss = augmented_triplet_loss(f, y, prototypes, 0.5)
        torch.testing.assert_close(loss, ref_triplet(f, y, prototypes, 0.5))
    assert loss > 0


def test_projected_step_matches_the_official_adam_and_stays_in_the_drift_resistant_space(float64):
    """Task 1: S from the subtracted network over the task's data, V from its SVD with the share
    of singular values ≥ 0.9, T = VVᵀ/‖VVᵀ‖; the official Adam update, U·T for A and T·U for B."""
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    s = make()
    start_task(s, stream.train[0], [])
    randomise(s)
    s.after_task(0)  # folds the random pair into old_delta
    batches = [(torch.rand(5, 3, 16, 16), torch.tensor([2, 3, 2, 3, 2]), torch.ones(5, dtype=torch.long))
               for _ in range(2)]
    record = {}
    with torch.no_grad():
        for b in batches:
            ref_features(s, b[0], "input", record)
    start_task(s, stream.train[1], batches)
    params = s.lora_parameters()
    theta0 = [p.detach().clone() for p in params]
    head = [p for p in s.model.head.parameters() if p.requires_grad]
    head0 = [p.detach().clone() for p in head]
    s.mbatch = list(batches[0])
    s.optimizer.zero_grad()
    s.mb_output = s.forward()
    s.loss = s.criterion()
    s.backward()
    grads = [p.grad.clone() for p in params]
    head_grads = [p.grad.clone() for p in head]
    s.optimizer.step()
    lr, (b1, b2), eps = s.config.lr, (0.9, 0.999), 1e-8
    for p, p0, g in zip(head, head0, head_grads):  # fc_lrate, weight decay 0, no projection
        step = -s.config.head_lr * math.sqrt(1 - b2) / (1 - b1) * (1 - b1) * g / ((1 - b2) ** 0.5 * g.abs() + eps)
        torch.testing.assert_close(p.detach(), p0 + step, rtol=1e-8, atol=1e-12)
    for i, adapter in enumerate(s.adapters):
        _, sv, vecs = torch.svd(record[i][0], some=False)
        cumulative = sv.cumsum(0) / sv.sum()
        k = int((cumulative >= 0.9).nonzero()[0][0]) + 1
        basis = vecs[:, :k]
        t = basis @ basis.T
        t = t / torch.norm(t)
        for j, p in enumerate(params):
            if not any(p is q for q in (adapter.down_k, adapter.down_v, adapter.up_k, adapter.up_v)):
                continue
            g = grads[j]
            m, v = (1 - b1) * g, (1 - b2) * g * g
            update = -lr * math.sqrt(1 - b2) / (1 - b1) * m / (v.sqrt() + eps)
            update = t @ update if update.shape[0] == t.shape[0] else update @ t
            torch.testing.assert_close(p.detach(), theta0[j] + update, rtol=1e-8, atol=1e-12)
            # the update lies in the drift-resistant space: nothing outside span(V)
            delta = p.detach() - theta0[j]
            outside = delta - (basis @ basis.T @ delta if delta.shape[0] == t.shape[0] else delta @ basis @ basis.T)
            assert outside.abs().max() < 1e-12 * max(1.0, delta.abs().max())
    assert s.task_info()["basis_dims"] == [int(d) for d in s.basis_dims] and len(s.basis_dims) == 2


def test_state_after_a_task_prototypes_and_ncm_inference(float64):
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    s = make(stats_transform="test")
    s.train(stream.train[0])
    before = [a.old_delta.clone() for a in s.adapters]
    s.train(stream.train[1])
    for a, old in zip(s.adapters, before):  # stored state: old + this task's rank-r B·A per slice
        assert torch.count_nonzero(a.up_k) == 0 and torch.count_nonzero(a.up_v) == 0
        for added in a.old_delta - old:
            assert 0 < int(torch.linalg.matrix_rank(added)) <= s.config.rank
    data = stream.train[1].dataset
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        f = ref_features(s, images, "test")
        for c in labels.unique():
            torch.testing.assert_close(s.statistics.means()[c], f[labels == c].mean(0))
        x = torch.rand(4, 3, 16, 16)
        protos = s.statistics.means()[:4]
        fx = F.normalize(ref_features(s, x, "test"), dim=1)
        dists = torch.cdist(fx, F.normalize(protos, dim=1)) ** 2
        s.model.eval()
        s.is_training = False
        s.mbatch = [x, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)]
        logits = s.forward()
    assert torch.equal(logits.argmax(1), dists.argmin(1))
    torch.testing.assert_close(logits.double(), 1 - dists / 2, rtol=1e-5, atol=1e-6)


def test_checkpoint_resume_continues_identically():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    config = dict(epochs=1, batch_size=8, rank=3)
    first = build(LoRASubDRS, tiny_vit(depth=2), n_tasks=2, **config)
    first.train(stream.train[0])
    second = build(LoRASubDRS, tiny_vit(depth=2), n_tasks=2, **config)
    second.load_checkpoint(first.checkpoint())
    torch.manual_seed(5)
    first.train(stream.train[1])
    torch.manual_seed(5)
    second.train(stream.train[1])
    for a, b in zip(first.adapters, second.adapters):
        assert torch.equal(a.old_delta, b.old_delta)
    assert first.evaluate_counts(stream.test) == second.evaluate_counts(stream.test)
    assert first.basis_dims == second.basis_dims


def test_training_step_runs_under_bf16_autocast():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    s = build(LoRASubDRS, tiny_vit(depth=2), n_tasks=2, epochs=1, batch_size=8, rank=3)
    s.train(stream.train[0])
    batch = [torch.rand(4, 3, 16, 16), torch.tensor([2, 3, 2, 3]), torch.ones(4, dtype=torch.long)]
    start_task(s, stream.train[1], [batch])
    s.mbatch = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s.mb_output = s.forward()
        loss = s.criterion()
    loss.backward()
    s.optimizer.step()
    assert all(torch.isfinite(p).all() for p in s.lora_parameters())
    assert s.adapters[0].up_k.grad.abs().sum() > 0 and loss.dtype == torch.float32


@pytest.mark.parametrize("config", [dict(share=0.0), dict(rank=0), dict(margin=-1.0),
                                    dict(stats_transform="x")])
def test_bad_options_are_usage_errors(config):
    with pytest.raises(UsageError):
        LoRASubDRSConfig(**config)


def test_recipes_follow_the_official_configs():
    assert LoRASubDRS.defaults_for("cifar100", 20)["triplet_weight"] == 0.05  # configs/cifar100.json
    assert LoRASubDRS.defaults_for("cifar100", 10)["triplet_weight"] == 0.05431  # LibContinual's
    cub = LoRASubDRS.defaults_for("cub200", 20)  # configs/cub.json
    assert (cub["epochs"], cub["head_lr"], cub["margin"], cub["triplet_weight"]) == (20, 1e-3, 1.0, 0.2)
    dn = LoRASubDRS.defaults_for("domainnet", 5)  # configs/domainnet.json
    assert (dn["epochs"], dn["head_lr"], dn["rank"], dn["margin"], dn["triplet_weight"]) == \
        (5, 1e-3, 40, 2.0, 0.1)
    inr = LoRASubDRS.defaults_for("imagenet-r", 10)
    assert (inr["first_epochs"], inr["epochs"], inr["margin"]) == (40, 50, 2.0)
    s = build(LoRASubDRS, tiny_vit(depth=1), n_tasks=2, **{**inr, "rank": 2})
    assert (s.epochs_for_task(0), s.epochs_for_task(1)) == (40, 50)
    s = build(LoRASubDRS, tiny_vit(depth=1), n_tasks=2, **{**inr, "rank": 2, "epochs": 2})
    assert (s.epochs_for_task(0), s.epochs_for_task(1)) == (2, 2)  # --epochs bounds every task
    # _build_protos reads the training images under the test transform (mode='test')
    assert LoRASubDRSConfig().stats_transform == "test"


def test_a_fresh_pair_is_initialised_as_the_official_init_param():
    """A: kaiming-uniform(a = √5) as nn.Linear(D, r); B: nn.init.sparse_(sparsity = 1 − 1/D), one
    N(0, 0.01) entry in each of its r columns."""
    s = make(rank=3)
    s.before_task(0)
    for a in s.adapters:
        for t in ("k", "v"):
            down, up = a.pair(t)
            assert (torch.count_nonzero(up, dim=0) == 1).all()
            assert 0 < up.abs().max() < 0.1
            bound = 1 / math.sqrt(a.dim)  # kaiming_uniform(a=√5) on fan_in D
            assert down.abs().max() <= bound and down.abs().max() > bound / 2
