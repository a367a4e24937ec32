"""Shared prompt/prefix injection (clbench.methods.prompt) and the L2P, L2P++ and CODA-Prompt methods."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.nn import functional as F

timm = pytest.importorskip("timm")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from clbench.methods import prompt as prompting  # noqa: E402
from clbench.benchmark import SplitData  # noqa: E402
from clbench.methods.prompt.coda_prompt import (CodaPrompt, component_weights,  # noqa: E402
                                         gram_schmidt_rows, ortho_penalty)
from clbench.methods.prompt.l2p import (L2P, L2PPlusPlus, PromptPool, pull_loss,  # noqa: E402
                                 select_prompts)
from clbench.context import RunContext  # noqa: E402
from clbench.errors import UsageError  # noqa: E402
from clbench.streams import build_stream  # noqa: E402
from helpers import build  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(dim=48, depth=2, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=dim, depth=depth, num_heads=3,
                             num_classes=0).eval()


def make_strategy(cls, vit, n_tasks=2, **config):
    return build(cls, vit, n_tasks=n_tasks, **config)


class _Images(torch.utils.data.Dataset):
    """Class-dependent random 16×16 images: a few per class, deterministic."""

    def __init__(self, n_classes, per_class, seed):
        g = torch.Generator().manual_seed(seed)
        self.targets = [c for c in range(n_classes) for _ in range(per_class)]
        means = torch.rand(n_classes, 3, 1, 1, generator=g)
        self.images = [means[c] + 0.2 * torch.rand(3, 16, 16, generator=g) for c in self.targets]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def toy_stream(n_tasks=2, classes_per_task=2, per_class=8):
    n = n_tasks * classes_per_task
    split = SplitData(_Images(n, per_class, 0), _Images(n, 2, 1))
    return build_stream(split, list(range(n)), n_tasks)


def params_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ shared injection mechanics
def test_query_is_the_unprompted_cls_feature_without_gradient():
    vit = tiny_vit()
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    q = prompting.query_features(vit, x)
    assert not q.requires_grad and q.grad_fn is None
    assert torch.equal(q, vit.forward_features(x)[:, 0].detach())
    torch.testing.assert_close(q, vit(x))  # timm's pooled ('token') output is the same CLS


def test_prompted_pass_without_prompts_is_timms_forward():
    vit = tiny_vit()
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(prompting.prompted_tokens(vit, x), vit.forward_features(x),
                               rtol=1e-5, atol=1e-5)
    empty = torch.zeros(2, 0, vit.embed_dim)
    torch.testing.assert_close(prompting.prompted_tokens(vit, x, prefixes={0: (empty, empty)}),
                               vit.forward_features(x), rtol=1e-5, atol=1e-5)


def test_prefix_attention_matches_explicit_softmax_attention():
    vit = tiny_vit()
    attn = vit.blocks[1].attn
    x, pk, pv = torch.randn(2, 17, 48), torch.randn(2, 6, 48), torch.randn(2, 6, 48)
    out = prompting.attention_with_prefix(attn, x, pk, pv)
    q, k, v = attn.qkv(x).reshape(2, 17, 3, 3, 16).permute(2, 0, 3, 1, 4)
    heads = lambda t: t.reshape(2, 6, 3, 16).transpose(1, 2)  # noqa: E731
    k, v = torch.cat([heads(pk), k], 2), torch.cat([heads(pv), v], 2)
    weights = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 17, 48))
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_split_prefix_sends_first_half_of_each_prompt_to_keys():
    prompts = torch.arange(2 * 3 * 4 * 5, dtype=torch.float).view(2, 3, 4, 5)  # B, N, L, D
    keys, values = prompting.split_prefix(prompts)
    assert keys.shape == values.shape == (2, 6, 5)
    assert torch.equal(keys[0, :2], prompts[0, 0, :2]) and torch.equal(values[0, 2:4], prompts[0, 1, 2:])


def test_default_blocks_are_cut_to_depth_but_user_blocks_must_exist():
    default = [0, 1, 2, 3, 4]
    assert prompting.prompt_blocks(default, default, 4, "coda-prompt") == [0, 1, 2, 3]
    assert prompting.prompt_blocks([0], [0], 12, "l2p-pp") == [0]
    assert prompting.prompt_blocks([3, 1], [0], 4, "l2p-pp") == [1, 3]
    for bad in ([20], [0, 5], [1, 1], [-1]):
        with pytest.raises(UsageError):
            prompting.prompt_blocks(bad, [0], 4, "l2p-pp")
    with pytest.raises(UsageError):  # a default list with no block in range
        prompting.prompt_blocks([5, 6], [5, 6], 4, "x")


@pytest.mark.parametrize("cls,config", [
    (L2PPlusPlus, dict(prompt_blocks=[20])),
    (CodaPrompt, dict(prompt_blocks=[0, 7])),
    (CodaPrompt, dict(n_components=3)),  # 3 components over 5 tasks
    (CodaPrompt, dict(n_components=1000)),  # more than embed_dim orthogonal slots
])
def test_validate_refuses_options_that_do_not_fit_the_run(cls, config):
    context = RunContext(n_tasks=5, backbone_depth=4, embed_dim=768)
    with pytest.raises(UsageError):
        cls.validate(cls.Config(**config), context)
    cls.validate(cls.Config(), context)  # the defaults fit (CODA's blocks 0-4 cut to 0-3)


@pytest.mark.parametrize("cls,config", [
    (L2P, dict(top_k=11)), (L2P, dict(insertion="deep")), (L2P, dict(schedule="linear")),
    (L2P, dict(insertion="prefix", head_input="cls", prompt_length=5)),
    (CodaPrompt, dict(prompt_length=7)), (CodaPrompt, dict(grad_clip=-1.0)),
])
def test_field_checks_are_usage_errors(cls, config):
    with pytest.raises(UsageError):
        cls.Config(**config)


# ------------------------------------------------------------------ ViT-B/16 shapes
def test_vit_b16_sequence_lengths_of_l2p_and_coda(monkeypatch):
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    x = torch.rand(1, 3, 224, 224)
    # L2P: input prompts -> 197 + N·L_p tokens
    l2p = make_strategy(L2P, vit)
    assert l2p.model.backbone is vit  # the query pass reuses the same module, no second copy
    pool = l2p.model.prompt[0]
    with torch.no_grad():
        idx = select_prompts(pool.similarity(prompting.query_features(vit, x)), 5, True)
        tokens = prompting.prompted_tokens(vit, x, input_prompts=pool.prompts[idx].flatten(1, 2))
    assert tokens.shape == (1, 197 + 5 * 5, 768)
    # CODA: blocks 0-4 see 197 + 4 keys/values, every output stays 197 long
    coda = make_strategy(CodaPrompt, vit, n_tasks=10)  # run context: 10 tasks
    assert coda.prompt_blocks == [0, 1, 2, 3, 4]
    coda.model.head.grow(20)
    coda.model.prompt.init_slots(0, 10)
    coda.task, coda.is_training, coda.mbatch = 0, False, [x, torch.zeros(1, dtype=torch.long), 0]
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[2], k.shape[2], v.shape[2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        logits = coda.forward()
    assert logits.shape == (1, 20)
    # timm's own Attention also calls SDPA: 12 query-pass blocks, then the prompted pass, whose
    # 7 un-prompted blocks run timm's own forward
    assert seen == [(197, 197, 197)] * 12 + [(197, 201, 201)] * 5 + [(197, 197, 197)] * 7


# ------------------------------------------------------------------ L2P
def test_batchwise_selection_uses_the_most_frequent_indices_for_every_sample():
    torch.manual_seed(0)
    sim = torch.rand(16, 10)
    idx = select_prompts(sim, 3, batchwise=True)
    per_sample = sim.topk(3, dim=1).indices
    counts = collections.Counter(per_sample.flatten().tolist())
    ranked = sorted(counts, key=lambda i: (-counts[i], i))[:3]
    assert idx.shape == (16, 3)
    assert all(row == ranked for row in idx.tolist())
    assert torch.equal(select_prompts(sim, 3, batchwise=False), per_sample)


def test_pull_step_raises_cosine_of_selected_keys_only():
    torch.manual_seed(0)
    pool = PromptPool(10, 5, 24)
    q = torch.randn(8, 24)
    sim = pool.similarity(q)
    idx = select_prompts(sim, 3, batchwise=True)
    selected = idx[0].tolist()
    before_keys = pool.keys.detach().clone()
    before = pool.similarity(q).gather(1, idx).mean()
    opt = torch.optim.SGD([pool.keys], lr=0.5)
    pull_loss(sim, idx, "l2p").backward()
    assert pool.prompts.grad is None  # the pull term reaches the keys only
    opt.step()
    after = pool.similarity(q).gather(1, idx).mean()
    assert after > before
    unselected = [i for i in range(10) if i not in selected]
    assert torch.equal(pool.keys[unselected], before_keys[unselected])
    assert not torch.equal(pool.keys[selected], before_keys[selected])


def test_coda_style_pull_sums_over_all_sample_key_pairs():
    sim = torch.rand(4, 6)
    idx = torch.tensor([[0, 1], [2, 3], [0, 5], [1, 1]])
    explicit = sum(1 - sim[b, idx[c, j]] for b in range(4) for c in range(4) for j in range(2))
    torch.testing.assert_close(pull_loss(sim, idx, "coda"), explicit)
    per_sample = sum(1 - sim[b, idx[b, j]] for b in range(4) for j in range(2)) / 4
    torch.testing.assert_close(pull_loss(sim, idx, "l2p"), per_sample)


def test_l2p_head_reads_the_mean_of_the_prompt_positions():
    vit = tiny_vit()
    s = make_strategy(L2P, vit, pool_size=6, prompt_length=2, top_k=3)
    s.model.head.grow(2)
    x = torch.rand(4, 3, 16, 16)
    s.is_training, s.mbatch = False, [x, torch.zeros(4, dtype=torch.long), 0]
    with torch.no_grad():
        logits = s.forward()
        pool = s.model.prompt[0]
        idx = select_prompts(pool.similarity(prompting.query_features(vit, x)), 3, True)
        tokens = prompting.prompted_tokens(vit, x, input_prompts=pool.prompts[idx].flatten(1, 2))
    assert tokens.shape[1] == 17 + 6
    torch.testing.assert_close(logits, s.model.head(tokens[:, 1:7].mean(1)))


# ------------------------------------------------------------------ CODA-Prompt
def test_gram_schmidt_new_rows_orthonormal_and_orthogonal_to_old_span():
    torch.manual_seed(0)
    m = torch.randn(12, 40)  # old rows 0..4 deliberately not orthogonal (as after training)
    out = gram_schmidt_rows(m, 5, 9)
    assert torch.equal(out[:5], m[:5]) and torch.equal(out[9:], m[9:])
    new = out[5:9].double()
    torch.testing.assert_close(new @ new.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (new @ m[:5].double().T).abs().max() < 1e-5
    with pytest.raises(ValueError):
        gram_schmidt_rows(torch.randn(50, 40), 0, 41)


def test_component_weights_are_cosines_in_range():
    torch.manual_seed(0)
    q, keys, att = torch.randn(5, 24), torch.randn(7, 24), torch.randn(7, 24)
    alpha = component_weights(q, keys, att)
    assert alpha.shape == (5, 7) and alpha.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(component_weights(q, keys, torch.ones(7, 24)),
                               F.normalize(q, dim=1) @ F.normalize(keys, dim=1).T)


def test_coda_tiny_backbone_clamps_blocks_and_sizes_slots():
    s = make_strategy(CodaPrompt, tiny_vit(depth=4), n_components=20, n_tasks=5)
    assert s.prompt_blocks == [0, 1, 2, 3]
    assert s.model.prompt.keys.shape == (4, 20, 48) and s.slots(2) == (8, 12)
    assert s.model.prompt.prompts.shape == (4, 20, 8, 48)


def test_ortho_penalty_enters_the_loss_and_reaches_only_new_slots():
    assert float(ortho_penalty(torch.eye(4))) == 0 and float(ortho_penalty(torch.ones(2, 2))) > 0
    s = make_strategy(CodaPrompt, tiny_vit(), n_components=8, n_tasks=2, ortho_weight=0.1)
    s.model.prompt.init_slots(0, 4)
    s.model.prompt.init_slots(4, 8)
    with torch.no_grad():
        s.model.prompt.keys[:, 4:] += 0.3  # break orthogonality of the new slots
    s.model.head.grow(4)
    s.task, s.known_classes, s.is_training = 1, 2, True
    s.mbatch = [torch.rand(4, 3, 16, 16), torch.tensor([2, 3, 2, 3]), 0]
    s.forward()
    loss = s.extra_loss()
    assert float(loss.detach()) > 0
    loss.backward()
    grad = s.model.prompt.keys.grad
    assert torch.all(grad[:, :4] == 0) and grad[:, 4:].abs().sum() > 0
    s.is_training = False
    s.forward()
    assert s.extra_loss() == 0  # no penalty outside training


# ------------------------------------------------------------------ training over two tasks
def _train_two_tasks(strategy, stream, probe_between=None):
    strategy.train(stream.train[0])
    snapshot = params_of(strategy.model)
    if probe_between:
        probe_between(strategy)
    strategy.train(stream.train[1])
    return snapshot


def _masked_head_grad(strategy, stream):
    """Head gradient of one training loss on task-1 images (after task 1)."""
    x = torch.stack([stream.train[1].dataset[i][0] for i in range(4)])
    y = torch.tensor([stream.train[1].dataset[i][1] for i in range(4)])
    strategy.model.train()
    strategy.is_training, strategy.mbatch = True, [x, y, torch.zeros(4, dtype=torch.long)]
    strategy.model.zero_grad()
    strategy.mb_output = strategy.forward()
    strategy.criterion().backward()
    return strategy.model.head.fc.weight.grad


@pytest.mark.parametrize("cls,config", [
    (L2P, dict(pool_size=6, prompt_length=2, top_k=2)),
    (L2PPlusPlus, dict(pool_size=6, prompt_length=4, top_k=2, prompt_blocks=[1, 0])),
    (CodaPrompt, dict(n_components=8, n_tasks=2)),
])
def test_two_tasks_keep_backbone_and_old_parts_fixed(cls, config):
    stream = toy_stream()
    s = make_strategy(cls, tiny_vit(), epochs=2, batch_size=8, lr=0.01, **config)
    pretrained = params_of(s.model.backbone)
    snapshot = _train_two_tasks(s, stream)
    after = params_of(s.model)
    for key, value in pretrained.items():
        assert torch.equal(after[f"backbone.{key}"], value), key
    # old head rows: zero CE gradient (current-task logits only), so unchanged by Adam
    assert torch.equal(after["head.fc.weight"][:2], snapshot["head.fc.weight"])
    grad = _masked_head_grad(s, stream)
    assert torch.all(grad[:2] == 0) and grad[2:].abs().sum() > 0
    if cls is CodaPrompt:
        for name in ("prompts", "keys", "attention"):
            old, new = after[f"prompt.{name}"], snapshot[f"prompt.{name}"]
            assert torch.equal(old[:, :4], new[:, :4]), name  # task-0 slots frozen in task 1
            assert not torch.equal(old[:, 4:], new[:, 4:]), name
        keys = after["prompt.keys"][0]
        # the task-1 slots were created orthogonal to the task-0 slots and trained from there
        assert keys.shape == (8, 48)
    else:
        assert s.task_info()["prompt_blocks"] == ([] if cls is L2P else [0, 1])


def _norms_at_each_step(monkeypatch, s, stream, groups):
    """Train one task; at every optimiser step, the gradient norm of each parameter set."""
    norms, real = [], torch.optim.Adam.step

    def step(optimizer, *args, **kwargs):
        norms.append([float(torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for p in group(s) if p.grad is not None]))) for group in groups])
        return real(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    s.train(stream.train[0])
    assert norms, "no optimiser step ran"
    return torch.tensor(norms)


def _stepped(s):
    return [p for group in s.optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("cls,clip,config", [(L2P, 1e-4, {}), (CodaPrompt, 1e-4, dict(n_components=8)),
                                             (L2PPlusPlus, 0.0, {})])
def test_the_core_clips_gradients_before_every_optimizer_step(monkeypatch, cls, clip, config):
    """``grad_clip`` reaches every step of the core's training loop (the ``clip_gradients`` hook):
    the norm the optimiser sees is the clip; with 0 the gradients pass untouched."""
    s = make_strategy(cls, tiny_vit(), epochs=1, batch_size=8, lr=0.01, grad_clip=clip, **config)
    norms = _norms_at_each_step(monkeypatch, s, toy_stream(), [_stepped])
    if clip:
        torch.testing.assert_close(norms, torch.full_like(norms, clip), rtol=1e-3, atol=0)
    else:
        assert float(norms.min()) > 1e-3  # unclipped gradients are far above 1e-4


def test_coda_new_slots_are_gram_schmidt_orthogonal_at_task_start():
    stream = toy_stream()
    s = make_strategy(CodaPrompt, tiny_vit(), epochs=1, batch_size=8, n_components=8, n_tasks=2)
    s.train(stream.train[0])
    old = params_of(s.model)["prompt.keys"]
    s.model.prompt.init_slots(*s.slots(1))
    for name in ("keys", "attention", "prompts"):
        t = getattr(s.model.prompt, name).detach().flatten(2).double()  # layers, M, n
        new = t[:, 4:]
        gram = new @ new.transpose(1, 2)
        torch.testing.assert_close(gram, torch.eye(4, dtype=torch.float64).expand_as(gram),
                                   atol=1e-6, rtol=0)
        assert (new @ t[:, :4].transpose(1, 2)).abs().max() < 1e-5
    assert torch.equal(s.model.prompt.keys[:, :4], old[:, :4])


def test_checkpoint_resume_rebuilds_the_same_model():
    stream = toy_stream()
    for cls, config in [(L2P, dict(pool_size=6, prompt_length=2, top_k=2)),
                        (CodaPrompt, dict(n_components=8, n_tasks=2))]:
        s = make_strategy(cls, tiny_vit(), epochs=1, batch_size=8, **config)
        s.train(stream.train[0])
        ckpt = s.checkpoint()
        assert not any(k.startswith("backbone.") for k in ckpt["model"])
        assert any(k.startswith("prompt.") for k in ckpt["model"])
        fresh = make_strategy(cls, tiny_vit(), epochs=1, batch_size=8, **config)
        fresh.load_checkpoint(ckpt)
        assert fresh.task == 0
        x = torch.rand(4, 3, 16, 16)
        for strat in (s, fresh):
            strat.model.eval()
            strat.is_training, strat.mbatch = False, [x, torch.zeros(4, dtype=torch.long), 0]
        with torch.no_grad():
            torch.testing.assert_close(s.forward(), fresh.forward())


def test_query_cache_computes_each_training_image_once_and_changes_nothing(monkeypatch):
    stream = toy_stream(n_tasks=1, per_class=8)
    computed = []
    real = prompting.injection.query_features

    def counting(vit, x):
        computed.append(len(x))
        return real(vit, x)

    monkeypatch.setattr(prompting.injection, "query_features", counting)
    results = {}
    for cache in (False, True):
        computed.clear()
        s = make_strategy(L2P, tiny_vit(), epochs=3, batch_size=4, pool_size=6, prompt_length=2,
                          top_k=2, cache_queries=cache)
        torch.manual_seed(1)
        s.train(stream.train[0])
        results[cache] = (sum(computed), params_of(s.model))
    n = len(stream.train[0].dataset)
    assert results[False][0] == 3 * n and results[True][0] == n
    for key, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ determinism on CPU
class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten call below autograd (forward and backward), with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _accumulating_index_puts(calls):
    """index_put(accumulate=True) on float tensors: on a multi-threaded CPU its gradient sums are
    float atomics in thread order (at::native index_put_kernel), so identical runs differ."""
    found = []
    for func, args, kwargs in calls:
        if "index_put" in str(func):
            accumulate = kwargs.get("accumulate", args[3] if len(args) > 3 else False)
            if accumulate and args[0].is_floating_point():
                found.append(str(func))
    return found


@pytest.mark.parametrize("cls,config", [
    (L2P, dict(pool_size=6, prompt_length=2, top_k=3)),  # batch-wise vote: every index B times
    (L2PPlusPlus, dict(pool_size=6, prompt_length=4, top_k=2, prompt_blocks=[0])),  # coda pull
])
def test_l2p_training_step_sums_repeated_indices_in_a_fixed_order(cls, config):
    s = make_strategy(cls, tiny_vit(), **config)
    s.model.head.grow(2)
    x, y = torch.rand(8, 3, 16, 16), torch.tensor([0, 1] * 4)
    s.model.train()
    s.is_training, s.mbatch = True, [x, y, torch.zeros(8, dtype=torch.long)]
    with _RecordOps() as ops:
        s.mb_output = s.forward()
        (s.criterion() + s.extra_loss()).backward()
    assert s.model.prompt[0].prompts.grad is not None
    assert _accumulating_index_puts(ops.calls) == []


def test_batchwise_prompt_gradient_is_bit_identical_on_two_threads():
    """What the structural test protects, measured: the shape of the digits job (batch 32, pool
    10 × 5 × 96, top 5) gives a 76,800-element gradient, above the parallel-atomics threshold."""
    from clbench.methods.prompt.l2p import take

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        prompts = torch.randn(10, 5, 96, generator=g).requires_grad_()
        idx = torch.tensor([3, 1, 7, 0, 5]).expand(32, -1)  # a batch-wise vote
        upstream = torch.randn(32, 5, 5, 96, generator=g)
        grads = set()
        for _ in range(30):
            prompts.grad = None
            take(prompts, idx).backward(upstream)
            grads.add(prompts.grad.numpy().tobytes())
        assert len(grads) == 1
    finally:
        torch.set_num_threads(before)
