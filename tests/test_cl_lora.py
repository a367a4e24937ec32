"""CL-LoRA: parity with a reference written from the official code (JiangpengHe/CL-LoRA,
``backbone/vit_cllora.py`` Attention_lora/forward_train/forward_general_cls/forward_test,
``models/cllora.py`` _init_train/_KD_loss/compute_orthogonality_loss/replace_fc,
``backbone/linears.py`` CosineLinearFeature.forward_diagonal) on identical random weights in
float64, and the method's invariants."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import build, tensor_stream, tiny_vit
from torch.nn import functional as F

from clbench.context import RunContext
from clbench.errors import UsageError
from clbench.methods.lora.cl_lora import CLLoRA, CLLoRAConfig
from clbench.methods.lora.cl_lora.adapter import tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def make(n_tasks=2, **config):
    vit = tiny_vit(depth=4).double()
    return build(CLLoRA, vit, n_tasks=n_tasks, **{"epochs": 1, "batch_size": 8, "rank": 3,
                                                  "lr": 0.05, "weight_decay": 5e-4, **config})


def randomise(s, scale=0.3):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in s.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        s.model.head.sigma.fill_(1.7)
        for a in s.shared:
            a.old_up_q.copy_(torch.randn(a.old_up_q.shape, generator=g) * scale)
            a.old_up_v.copy_(torch.randn(a.old_up_v.shape, generator=g) * scale)


def start_task(s, experience):
    s.experience = experience
    s.check_model_and_optimizer()
    s.is_training = True
    s.model.train()


# ----------------------------------------------------------------- the reference (official maths)
def ref_attention(block, h, adapters, weights):
    """Attention_lora.forward: separate q/k/v projections, LoRA A(B x) on q and v times the
    block weight (1 for the shared blocks)."""
    qkv = block.attn.qkv.qkv
    d = h.shape[-1]
    w, b = qkv.weight, qkv.bias
    q = h @ w[:d].T + b[:d]
    k = h @ w[d:2 * d].T + b[d:2 * d]
    v = h @ w[2 * d:].T + b[2 * d:]
    (down_q, up_q), (down_v, up_v) = adapters
    q = q + weights[0] * (h @ down_q.T @ up_q.T)
    v = v + weights[2] * (h @ down_v.T @ up_v.T)
    heads = block.attn.num_heads
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    attn = (split(q) @ split(k).transpose(-2, -1) * (d // heads) ** -0.5).softmax(-1)
    out = (attn @ split(v)).transpose(1, 2).reshape(h.shape)
    return block.attn.proj(out)


def ref_features(s, x, shared, specific, weights, blocks=None):
    """forward_train / forward_proto / forward_general_cls (``blocks``: only the shared ones)."""
    vit = s.model.backbone
    h = tokens(vit, x)
    ones = torch.ones(3)
    for j in (blocks if blocks is not None else range(len(vit.blocks))):
        block = vit.blocks[j]
        adapters, w = (shared[j], ones) if j < s.split else (specific[j - s.split], weights[j - s.split])
        h = h + ref_attention(block, block.norm1(h), adapters, w)
        h = h + block.mlp(block.norm2(h))
    return vit.norm(h)[:, 0]


def official_cosine_linear(f, weight, sigma):
    """CosineLinear.forward in its op order (σ times the linear of the unit vectors): the order
    matters once backward sees updated tensors."""
    return sigma * F.linear(F.normalize(f, dim=1), F.normalize(weight, dim=1))


def current_tensors(s, task=-1, old_shared=False):
    shared = [((a.down_q, a.old_up_q if old_shared else a.up_q), (a.down_v, a.old_up_v if old_shared else a.up_v))
              for a in s.shared]
    specific = [((a.downs_q[task], a.ups_q[task]), (a.downs_v[task], a.ups_v[task])) for a in s.specific]
    weights = [a.scales[task] for a in s.specific]
    return shared, specific, weights


# ----------------------------------------------------------------- parity
def test_training_forward_and_kd_features_match_the_official_maths(float64):
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    s = make()
    start_task(s, stream.train[0])
    randomise(s)
    x = torch.rand(5, 3, 16, 16)
    shared, specific, weights = current_tensors(s)
    ref = ref_features(s, x, shared, specific, weights)
    torch.testing.assert_close(s.model.features(x), ref, rtol=1e-10, atol=1e-10)
    head = s.model.head
    torch.testing.assert_close(s.model(x), official_cosine_linear(ref, head.blocks[0], head.sigma))
    ref_kd = ref_features(s, x, shared, specific, weights, blocks=range(s.split))
    torch.testing.assert_close(s.shared_features(x), ref_kd, rtol=1e-10, atol=1e-10)
    # the tiny backbone's boundary: half its depth (4 blocks: 2 shared, 2 task-specific)
    assert s.split == 2 and len(s.shared) == 2 and len(s.specific) == 2


def task_1_batch():
    """A strategy at the start of task 1 with random trainable tensors, and a batch."""
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    return stream, torch.rand(6, 3, 16, 16), torch.tensor([2, 3, 2, 3, 3, 2])


def reference_losses(s, ref, x, y):
    """The official losses of a task-1 batch on the leaves ``ref`` (copies of the trainable
    tensors in ``trainable_parameters`` order): CE + 1e-4·orthogonality, and 5·KD(T = 2) between
    the shared-blocks-only features with the current and the previous shared ups."""
    n_sh = 2 * len(s.shared)
    ups = ref[:n_sh]
    spec = ref[n_sh:n_sh + 5 * len(s.specific)]
    head_w, sigma = ref[-2], ref[-1]
    shared = [((a.down_q, ups[2 * i]), (a.down_v, ups[2 * i + 1])) for i, a in enumerate(s.shared)]
    old_shared = [((a.down_q, a.old_up_q), (a.down_v, a.old_up_v)) for a in s.shared]
    specific = [((spec[5 * i], spec[5 * i + 2]), (spec[5 * i + 1], spec[5 * i + 3])) for i in range(len(s.specific))]
    weights = [spec[5 * i + 4] for i in range(len(s.specific))]
    feats = ref_features(s, x, shared, specific, weights)
    ce = F.cross_entropy(official_cosine_linear(feats, head_w, sigma), y - 2)
    old_w = torch.cat([a.scales[0] for a in s.specific]).detach()
    cur_w = torch.cat(weights)
    ortho = (cur_w / (cur_w.norm() + 1e-8) * old_w / (old_w.norm() + 1e-8)).sum().abs()
    ce = ce + 1e-4 * ortho
    student = ref_features(s, x, shared, specific, weights, blocks=range(s.split))
    teacher = ref_features(s, x, old_shared, specific, weights, blocks=range(s.split))
    ls, lt = official_cosine_linear(student, head_w, sigma), official_cosine_linear(teacher, head_w, sigma)
    kd = 5.0 * -(torch.softmax(lt / 2, 1) * torch.log_softmax(ls / 2, 1)).sum() / len(x)
    return ce, kd


def reassigned(s, g_kd):
    g_kd = list(g_kd)
    for i, a in enumerate(s.shared):
        for j, old in enumerate((a.old_up_q, a.old_up_v)):
            norms = old.norm(dim=1)
            g_kd[2 * i + j] = g_kd[2 * i + j] * (len(norms) * norms / norms.sum()).unsqueeze(1)
    return g_kd


def sgd_step(values, grads, buffers, lr, wd):
    """torch SGD (momentum 0.9, dampening 0, L2 weight decay) on the tensors' data in place;
    a parameter without a gradient is skipped."""
    for k, g in enumerate(grads):
        if g is None:
            continue
        d = g + wd * values[k].data
        buffers[k] = d.clone() if buffers[k] is None else 0.9 * buffers[k] + d
        values[k].data -= lr * buffers[k]


def strategy_iteration(s, x, y):
    """One iteration in the template's order."""
    s.mbatch = [x, y, torch.ones_like(y)]
    s._finite = torch.ones((), dtype=torch.bool)
    s.optimizer.zero_grad()
    s.mb_output = s.forward()
    s.loss = s.criterion()
    s.backward()
    s.optimizer.step()


def at_task_1(stream, **config):
    s = make(**config)
    start_task(s, stream.train[0])
    s.after_task(0)
    start_task(s, stream.train[1])
    randomise(s)
    return s


def test_one_step_of_task_1_matches_the_official_two_steps(float64):
    """KD loss (×5, T = 2), its gradient reassigned by the old up-projections' row norms, one SGD
    step; then CE + 1e-4·orthogonality with the gradient taken at the batch's weights, a second
    step (momentum 0.9, weight decay, the same lr)."""
    stream, x, y = task_1_batch()
    s = at_task_1(stream)
    params = s.trainable_parameters()
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    ce, kd = reference_losses(s, ref, x, y)
    g_kd = reassigned(s, torch.autograd.grad(kd, ref, allow_unused=True))
    g_ce = torch.autograd.grad(ce, ref)
    n_sh = 2 * len(s.shared)
    assert g_kd[n_sh] is None and g_kd[0] is not None  # KD reaches only the shared blocks and head
    expected, buffers = [t.detach().clone() for t in ref], [None] * len(ref)
    for grads in (g_kd, g_ce):
        sgd_step(expected, grads, buffers, s.config.lr, s.config.weight_decay)

    strategy_iteration(s, x, y)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-12)


def test_ce_after_kd_step_reproduces_the_official_loop(float64):
    """``ce_after_kd_step``: the official loop verbatim. The CE forward, then the KD backward and
    step, which updates the shared ups and the proxy head in place without autograd seeing it
    (torch 2.0.1's foreach SGD; here ``.data``), then the CE backward through the forward's saved
    tensors (now partly the updated weights), and the second step."""
    stream, x, y = task_1_batch()
    s = at_task_1(stream, ce_after_kd_step=True)
    params = s.trainable_parameters()
    theta0 = [p.detach().clone() for p in params]
    ref = [t.clone().requires_grad_(True) for t in theta0]
    ce, kd = reference_losses(s, ref, x, y)
    kd.backward()
    buffers = [None] * len(ref)
    sgd_step(ref, reassigned(s, [t.grad for t in ref]), buffers, s.config.lr, s.config.weight_decay)
    for t in ref:
        t.grad = None
    ce.backward()
    sgd_step(ref, [t.grad for t in ref], buffers, s.config.lr, s.config.weight_decay)

    strategy_iteration(s, x, y)
    for p, e in zip(params, ref):
        torch.testing.assert_close(p.detach(), e.detach(), rtol=1e-9, atol=1e-12)
    default = at_task_1(stream)  # the same start; the mixture moves the result
    strategy_iteration(default, x, y)
    moved = [not torch.allclose(a, b, rtol=0, atol=1e-9)
             for a, b in zip(default.trainable_parameters(), params)]
    assert moved[0] and moved[-2]  # the first shared up and the proxy rows


def test_state_after_a_task_and_inference_match_forward_diagonal(float64):
    """After each task: class prototypes = means of branch-t features (current shared adapters,
    test images of the task's training set); a test image's logits for task i's classes are
    cos(branch-i features, prototypes); the shared teacher is the task-end snapshot."""
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    s = make()
    s.train(stream.train[0])
    s.train(stream.train[1])
    for a in s.shared:
        assert torch.equal(a.old_up_q, a.up_q) and torch.equal(a.old_up_v, a.up_v)
    images = torch.stack([stream.train[1].dataset[i][0] for i in range(len(stream.train[1].dataset))])
    labels = torch.tensor([stream.train[1].dataset[i][1] for i in range(len(images))])
    with torch.no_grad():
        feats = ref_features(s, images, *current_tensors(s, 1))
        for c in labels.unique():
            torch.testing.assert_close(s.statistics.means()[c], feats[labels == c].mean(0))
        x = torch.rand(3, 3, 16, 16)
        s.model.eval()
        s.is_training = False
        protos = s.statistics.means()
        expected = torch.cat([F.normalize(ref_features(s, x, *current_tensors(s, i)), dim=1)
                              @ F.normalize(protos[a:b], dim=1).T
                              for i, (a, b) in enumerate(s.task_ranges)], dim=1)
        torch.testing.assert_close(s.predict(x).double(), expected, rtol=1e-5, atol=1e-6)
    assert s.forward_passes_per_image == 2  # 2 shared blocks once + 2 × 2 task-specific of 4


# ----------------------------------------------------------------- invariants
def test_shared_projection_fixed_and_old_branches_bit_identical_after_a_new_task():
    stream = tensor_stream(n_classes=6, n_tasks=3, train_per_class=4)
    s = build(CLLoRA, tiny_vit(depth=4), n_tasks=3, epochs=1, batch_size=8, rank=3)
    downs = [(a.down_q.clone(), a.down_v.clone()) for a in s.shared]
    s.train(stream.train[0])
    branch0 = [[p.detach().clone() for p in (a.downs_q[0], a.downs_v[0], a.ups_q[0], a.ups_v[0], a.scales[0])]
               for a in s.specific]
    up_after_0 = s.shared[0].up_q.detach().clone()
    for e in stream.train[1:]:
        s.train(e)
    for a, (dq, dv) in zip(s.shared, downs):
        assert torch.equal(a.down_q, dq) and torch.equal(a.down_v, dv)
        eye = torch.eye(dq.shape[0])
        torch.testing.assert_close(a.down_q @ a.down_q.T, eye, atol=1e-5, rtol=0)
    for a, saved in zip(s.specific, branch0):
        now = (a.downs_q[0], a.downs_v[0], a.ups_q[0], a.ups_v[0], a.scales[0])
        assert all(torch.equal(p, q) for p, q in zip(now, saved)) and not now[0].requires_grad
        assert a.n_tasks == 3
    assert not torch.equal(s.shared[0].up_q, up_after_0)  # the shared ups keep learning
    assert s.task_info()["branches"] == 3


def test_checkpoint_restores_branches_prototypes_and_predictions():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    s = build(CLLoRA, tiny_vit(depth=4), n_tasks=2, epochs=1, batch_size=8, rank=3)
    for e in stream.train:
        s.train(e)
    fresh = build(CLLoRA, tiny_vit(depth=4), n_tasks=2, epochs=1, batch_size=8, rank=3)
    fresh.load_checkpoint(s.checkpoint())
    assert fresh.evaluate_counts(stream.test) == s.evaluate_counts(stream.test)
    x = torch.rand(3, 3, 16, 16)
    for strategy in (s, fresh):
        strategy.model.eval()
    with torch.no_grad():
        assert torch.equal(s.predict(x), fresh.predict(x))
    assert fresh.task_info() == s.task_info()


def test_training_step_runs_under_bf16_autocast():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    s = build(CLLoRA, tiny_vit(depth=4), n_tasks=2, epochs=1, batch_size=8, rank=3)
    s.train(stream.train[0])
    start_task(s, stream.train[1])
    s.mbatch = [torch.rand(4, 3, 16, 16), torch.tensor([2, 3, 2, 3]), torch.ones(4, dtype=torch.long)]
    s._finite = torch.ones((), dtype=torch.bool)
    s.optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s.mb_output = s.forward()
        s.loss = s.criterion()
    assert s._kd.dtype == torch.float32
    before = s.shared[0].up_q.detach().clone()
    s.backward()
    assert all(torch.isfinite(p.grad).all() for p in s.trainable_parameters() if p.grad is not None)
    assert not torch.equal(s.shared[0].up_q, before)  # the distillation step moved the shared up
    assert bool(s._finite)


@pytest.mark.parametrize("config", [dict(shared_blocks=0), dict(shared_blocks=4), dict(rank=200)])
def test_bad_options_are_usage_errors(config):
    with pytest.raises(UsageError):
        CLLoRA.validate(CLLoRAConfig(**config), RunContext(n_tasks=5, backbone_depth=4, embed_dim=96))
    CLLoRA.validate(CLLoRAConfig(shared_blocks=3), RunContext(n_tasks=5, backbone_depth=4, embed_dim=96))
    with pytest.raises(UsageError):  # bf16 autocast saves cast copies: no official mixture
        CLLoRA.validate(CLLoRAConfig(ce_after_kd_step=True), RunContext(n_tasks=5, precision="bf16"))
    assert CLLoRA.boundary(CLLoRAConfig(), 12) == 6  # the official 0-5 / 6-11 split


# ----------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_forgets_less_than_finetune_and_resumes_identically(tmp_path, cli, monkeypatch):
    args = ["run", "--methods", "cl-lora,lora-sub-drs,finetune", "--epochs", "2", "--out", tmp_path,
            "--no-report", "--seeds", "1993"]
    assert cli(*args, "--name", "straight")[0] == 0
    run = tmp_path / "straight" / "digits-5tasks"
    result = {m: json.loads((run / m / "seed-1993" / "results.json").read_text())
              for m in ("cl-lora", "lora-sub-drs", "finetune")}
    for method in ("cl-lora", "lora-sub-drs"):
        assert result[method]["metrics"]["forgetting"] < result["finetune"]["metrics"]["forgetting"]

    from clbench import runner

    real_save, saves = runner.save_checkpoint, []

    def save_then_die(path, checkpoint):
        real_save(path, checkpoint)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_checkpoint", save_then_die)
    killed = ["run", "--methods", "cl-lora,lora-sub-drs", "--epochs", "2", "--out", tmp_path,
              "--no-report", "--seeds", "1993", "--name", "killed"]
    assert cli(*killed)[0] == 130
    monkeypatch.setattr(runner, "save_checkpoint", real_save)
    assert cli("run", "--resume", tmp_path / "killed", "--no-report")[0] == 0
    for method in ("cl-lora", "lora-sub-drs"):
        resumed = json.loads((tmp_path / "killed" / "digits-5tasks" / method / "seed-1993"
                              / "results.json").read_text())
        assert resumed["correct"] == result[method]["correct"], method
