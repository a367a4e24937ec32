"""DualPrompt: parity with a reference written from the CODA-Prompt repo's DualPrompt + ViT code,
gradient routing (shared G-prompt, one E-prompt per task), top-1 selection, option checks, and an
end-to-end run against finetune on `digits`."""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from clbench.context import RunContext
from clbench.errors import UsageError
from clbench.methods.prompt.dualprompt import DualPrompt, DualPromptConfig
from helpers import build, tensor_stream, tiny_vit


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_forward(vit, x, prompt_of_block, head):
    """The official ViT loop (CODA-Prompt models/vit.py): per block, prefix keys/values
    ``(pk, pv)`` (B, P, D) are reshaped per head and concatenated *before* the token keys/values;
    explicit softmax attention; the head reads the CLS token after the final norm."""
    tokens = vit.patch_embed(x)
    tokens = torch.cat([vit.cls_token.expand(len(x), -1, -1), tokens], dim=1) + vit.pos_embed
    for i, block in enumerate(vit.blocks):
        h = block.norm1(tokens)
        attn = block.attn
        b, n, c = h.shape
        q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        if i in prompt_of_block:
            pk, pv = prompt_of_block[i]
            k = torch.cat([pk.reshape(b, -1, attn.num_heads, c // attn.num_heads).permute(0, 2, 1, 3), k], 2)
            v = torch.cat([pv.reshape(b, -1, attn.num_heads, c // attn.num_heads).permute(0, 2, 1, 3), v], 2)
        weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)
        out = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))
        tokens = tokens + out
        tokens = tokens + block.mlp(block.norm2(tokens))
    return head(vit.norm(tokens)[:, 0])


def reference_dualprompt(s, x, train, task_id):
    """CODA-Prompt models/zoo.py DualPrompt.forward, layer by layer, on the strategy's tensors."""
    p, vit = s.model.prompt, s.model.backbone
    q = vit.forward_features(x)[:, 0].detach()
    b, dim = q.shape
    prompts, loss = {}, 0.0
    for gi, layer in enumerate(s.g_blocks):
        g = p.g_prompts[gi].expand(b, -1, -1)
        j = g.shape[1] // 2
        prompts[layer] = (g[:, :j], g[:, j:])
    for ei, layer in enumerate(s.e_blocks):
        keys, pool = p.e_keys[ei], p.e_prompts[ei]
        cos = torch.einsum("bj,kj->bk", F.normalize(q, dim=1), F.normalize(keys, dim=1))
        i = pool.shape[1] // 2
        if train:
            loss = loss + (1.0 - cos[:, task_id]).sum()
            chosen = pool[task_id].expand(b, -1, -1)
            prompts[layer] = (chosen[:, :i].reshape(b, -1, dim), chosen[:, i:].reshape(b, -1, dim))
        else:
            k_idx = torch.topk(cos, 1, dim=1).indices
            chosen = pool[k_idx]  # B, 1, L, D
            prompts[layer] = (chosen[:, :, :i].reshape(b, -1, dim), chosen[:, :, i:].reshape(b, -1, dim))
    return reference_forward(vit, x, prompts, s.model.head), loss


def make(n_tasks=3, **config):
    vit = tiny_vit(dim=24, depth=5, heads=3)
    s = build(DualPrompt, vit, n_tasks=n_tasks, **config)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in s.model.prompt.parameters():
            param.normal_()  # random weights, not the [0, 1) init, so matching is informative
    s.model.head.grow(6)
    return s


def batch(s, x, training, task=0):
    s.is_training, s.task = training, task
    s.mbatch = [x, torch.zeros(len(x), dtype=torch.long), torch.zeros(len(x), dtype=torch.long)]


def test_forward_matches_the_official_dualprompt_at_test_and_training_time():
    s = make(g_length=4, e_length=6)
    assert (s.g_blocks, s.e_blocks) == ([0, 1], [2, 3, 4])
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        batch(s, x, training=False, task=2)
        expected, _ = reference_dualprompt(s, x, train=False, task_id=None)
        torch.testing.assert_close(s.forward(), expected, rtol=1e-5, atol=1e-5)
        batch(s, x, training=True, task=1)
        expected, pull = reference_dualprompt(s, x, train=True, task_id=1)
        torch.testing.assert_close(s.forward(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.extra_loss(), pull)


def test_top1_selection_per_e_block_follows_the_keys():
    s = make()
    x = torch.rand(4, 3, 16, 16)
    q = F.normalize(s.model.backbone.forward_features(x)[:, 0], dim=1)
    with torch.no_grad():  # block 2 keys: task 1's key is sample-agnostic closest to the queries
        s.model.prompt.e_keys[0] = torch.stack([-q.mean(0), q.mean(0), -q.mean(0)])
        batch(s, x, training=False, task=2)
        s.forward()
    assert s._test_choices[0].tolist() == [0, 4, 0]
    s._test_choices.zero_()
    restricted = make(match_unseen_keys=False)
    with torch.no_grad():
        restricted.model.prompt.e_keys[:] = -q.mean(0)
        restricted.model.prompt.e_keys[:, 2] = q.mean(0)  # best key, but task 2 is unseen
        batch(restricted, x, training=False, task=1)
        restricted.forward()
    assert restricted._test_choices[:, 2].sum() == 0


def test_only_the_current_e_prompt_and_key_and_the_g_prompt_get_gradients():
    s = make()
    batch(s, torch.rand(4, 3, 16, 16), training=True, task=1)
    s.mbatch[1] = torch.tensor([2, 3, 2, 3])
    s.known_classes = 2
    s.mb_output = s.forward()
    s.criterion().backward()
    p = s.model.prompt
    assert p.g_prompts.grad.abs().sum() > 0
    for grad in (p.e_prompts.grad, p.e_keys.grad):
        assert grad[:, 1].abs().sum() > 0
        assert torch.all(grad[:, 0] == 0) and torch.all(grad[:, 2] == 0)


def test_training_keeps_earlier_e_prompts_bit_identical_and_trains_the_g_prompt_each_task():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=6)
    s = build(DualPrompt, tiny_vit(dim=24, depth=5), n_tasks=2, epochs=2, batch_size=6, lr=0.01,
              g_length=2, e_length=2)
    init = {k: v.clone() for k, v in s.model.prompt.state_dict().items()}
    s.train(stream.train[0])
    after0 = {k: v.clone() for k, v in s.model.prompt.state_dict().items()}
    s.train(stream.train[1])
    after1 = s.model.prompt.state_dict()
    assert not torch.equal(after0["g_prompts"], init["g_prompts"])
    assert not torch.equal(after1["g_prompts"], after0["g_prompts"])
    for name in ("e_prompts", "e_keys"):
        assert not torch.equal(after0[name][:, 0], init[name][:, 0]), name
        assert torch.equal(after0[name][:, 1], init[name][:, 1]), name  # untouched in task 0
        assert torch.equal(after1[name][:, 0], after0[name][:, 0]), name  # frozen in task 1
        assert not torch.equal(after1[name][:, 1], after0[name][:, 1]), name
    info = s.task_info()
    assert info["trainable_params_this_task"] == s.trainable_parameter_count()
    assert info["stored_key_params"] == 3 * 2 * 24


@pytest.mark.parametrize("config", [dict(e_blocks=[2, 9]), dict(g_blocks=[0, 2]),
                                    dict(g_length=3)])
def test_bad_options_are_usage_errors(config):
    with pytest.raises(UsageError):
        DualPrompt.validate(DualPromptConfig(**config), RunContext(n_tasks=5, backbone_depth=4))
    DualPrompt.validate(DualPromptConfig(), RunContext(n_tasks=5, backbone_depth=4))  # 2-4 -> 2-3


@pytest.mark.slow
def test_dualprompt_and_hide_prompt_forget_less_than_finetune_on_digits(tmp_path):
    from clbench.cli import main

    code = main(["run", "--methods", "dualprompt,hide-prompt,finetune", "--out", str(tmp_path),
                 "--name", "e2e", "--no-report", "--seeds", "1993", "--epochs", "2",
                 "--set", "hide-prompt.tap_epochs=5"])
    assert code == 0
    forgetting = {}
    for method in ("dualprompt", "hide-prompt", "finetune"):
        path = tmp_path / "e2e" / "digits-5tasks" / method / "seed-1993" / "results.json"
        result = json.loads(path.read_text())
        assert result["forward_passes_per_image"] == (1 if method == "finetune" else 2)
        forgetting[method] = result["metrics"]["forgetting"]
        if method == "hide-prompt":
            assert result["method_info"][-1]["task_identity_accuracy"] > 0.5
    assert forgetting["dualprompt"] < forgetting["finetune"]
    assert forgetting["hide-prompt"] < forgetting["finetune"]


def test_checkpoint_resume_rebuilds_the_same_model():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    config = dict(epochs=1, batch_size=8, g_length=2, e_length=2)
    s = build(DualPrompt, tiny_vit(dim=24, depth=5), n_tasks=2, **config)
    s.train(stream.train[0])
    fresh = build(DualPrompt, tiny_vit(dim=24, depth=5), n_tasks=2, **config)
    fresh.load_checkpoint(s.checkpoint())
    x = torch.rand(4, 3, 16, 16)
    outputs = []
    for strategy in (s, fresh):
        strategy.model.eval()
        batch(strategy, x, training=False, task=0)
        with torch.no_grad():
            outputs.append(strategy.forward())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_training_step_runs_under_bf16_autocast():
    s = make()
    batch(s, torch.rand(4, 3, 16, 16), training=True, task=0)
    s.mbatch[1] = torch.tensor([0, 1, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s.mb_output = s.forward()
        loss = s.criterion()
    loss.backward()
    assert torch.isfinite(s.model.prompt.e_keys.grad).all() and s.model.prompt.g_prompts.grad.abs().sum() > 0
