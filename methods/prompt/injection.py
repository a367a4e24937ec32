"""Prompt and prefix injection into timm's own ``VisionTransformer``, shared by L2P, L2P++,
CODA-Prompt, DualPrompt and HiDe-Prompt. No forked ViT: the pretrained blocks are used as they
are, and nothing is patched.

Two passes of the *same* frozen weights per image (the prompt methods' protocol):

* ``query_features(vit, x)``: the un-prompted CLS feature (after the final LayerNorm), computed
  without a graph; it selects or weights the prompts.
* ``prompted_tokens(vit, x, input_prompts=..., prefixes=...)``: the prompted pass, returning all
  output tokens after the final LayerNorm.
  - ``input_prompts`` (B, P, D): *prompt tuning* (L2P). The tokens are inserted right after the
    class/register tokens, after patch embedding and position embedding, and get no position
    embedding of their own (as in the official JAX L2P; without a position embedding their place
    in the sequence changes nothing, since attention is permutation-equivariant).
  - ``prefixes`` {block index: (keys, values)}, each (B, P, D) or (P, D): *prefix tuning*
    (L2P++, CODA-Prompt). The vectors are prepended, per head, to that block's attention keys and
    values after the qkv projection (and after ``k_norm``, as the official codes have none);
    queries and the sequence length are unchanged. Computed with
    ``F.scaled_dot_product_attention``.

Blocks without a prefix run their own ``forward``; a prefixed block runs the same two residual
branches as timm's ``Block.forward`` around ``attention_with_prefix``, which uses the block's own
``qkv``/``q_norm``/``k_norm``/``norm``/``proj`` modules. ``check_promptable`` rejects other block
types up front rather than silently computing something else.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from clbench.errors import UsageError


def check_promptable(vit, prefix_blocks=()) -> None:
    """Fail early if the model is not a timm ViT whose prefixed blocks are plain ``Block``s."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"prompting needs a timm VisionTransformer, got {type(vit).__name__}")
    for i in prefix_blocks:
        block = vit.blocks[i]
        attn = getattr(block, "attn", None)
        if type(block) is not Block or type(attn) is not Attention:
            raise TypeError(f"prefix tuning supports timm Block/Attention, block {i} is "
                            f"{type(block).__name__}/{type(attn).__name__}")
        if getattr(attn, "gate", None) is not None:
            raise TypeError("prefix tuning does not support gated attention")


def promptable(backbone, config, context) -> str | None:
    """``requires`` entry of the prompt methods: a timm ViT whose blocks all take prefixes."""
    try:
        check_promptable(backbone, range(len(getattr(backbone, "blocks", ()))))
    except TypeError as exc:
        return str(exc)
    return None


def prompt_blocks(requested, default, depth: int, who: str) -> list[int]:
    """The prefix blocks a method uses in a ``depth``-block ViT.

    The method's *default* block list is cut to the blocks that exist (CODA's 0-4 become 0-3 on
    the 4-block tiny ViT; callers record the result in ``task_info``); a list the user chose must
    exist as given, otherwise this is a usage error (checked in ``validate``, before any job trains).
    """
    blocks = [int(b) for b in requested]
    if len(set(blocks)) != len(blocks) or any(b < 0 for b in blocks):
        raise UsageError(f"{who}: prompt_blocks must be distinct block indices >= 0, got {blocks}")
    if depth <= 0:  # depth unknown: nothing to check against
        return sorted(blocks)
    kept = sorted(b for b in blocks if b < depth)
    if list(requested) == list(default):
        if not kept:
            raise UsageError(f"{who}: none of the default prompt blocks {blocks} exists in a "
                             f"{depth}-block backbone; set prompt_blocks to indices 0..{depth - 1}")
        return kept
    if len(kept) != len(blocks):
        raise UsageError(f"{who}: prompt_blocks {blocks} do not all exist in a {depth}-block "
                         f"backbone; use indices 0..{depth - 1}")
    return kept


@torch.no_grad()
def query_features(vit, x: torch.Tensor) -> torch.Tensor:
    """CLS feature of the un-prompted pretrained ViT: the query of L2P and CODA-Prompt."""
    return vit.forward_features(x)[:, 0]


def split_prefix(prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ..., L, D) prompts -> (keys, values), each (B, n·L/2, D): the first half of every
    prompt's rows goes to the keys, the second half to the values (the official CODA codes)."""
    length = prompts.shape[-2]
    if length % 2:
        raise ValueError(f"prefix prompts need an even length, got {length}")
    half = length // 2
    batch, dim = prompts.shape[0], prompts.shape[-1]
    keys = prompts[..., :half, :].reshape(batch, -1, dim)
    values = prompts[..., half:, :].reshape(batch, -1, dim)
    return keys, values


def attention_with_prefix(attn, x: torch.Tensor, prefix_k: torch.Tensor,
                          prefix_v: torch.Tensor) -> torch.Tensor:
    """timm ``Attention.forward`` with extra key/value tokens; output keeps x's length."""
    batch, length, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)

    def per_head(prefix):
        if prefix.dim() == 2:
            prefix = prefix.unsqueeze(0).expand(batch, -1, -1)
        return prefix.reshape(batch, -1, heads, head_dim).transpose(1, 2).to(q.dtype)

    k = torch.cat([per_head(prefix_k), k], dim=2)
    v = torch.cat([per_head(prefix_v), v], dim=2)
    out = F.scaled_dot_product_attention(
        q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, length, attn.attn_dim))
    return attn.proj_drop(attn.proj(out))


def _prefixed_block(block, x, prefix_k, prefix_v):
    """timm ``Block.forward`` with the attention branch replaced by ``attention_with_prefix``."""
    x = x + block.drop_path1(block.ls1(attention_with_prefix(block.attn, block.norm1(x),
                                                             prefix_k, prefix_v)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def prompted_tokens(vit, x: torch.Tensor, input_prompts: torch.Tensor | None = None,
                    prefixes: dict | None = None) -> torch.Tensor:
    """timm ``forward_features`` with input prompts and/or per-block key/value prefixes.

    Returns (B, T, D) tokens after the final norm; with ``input_prompts`` of P tokens they sit at
    positions ``[vit.num_prefix_tokens, vit.num_prefix_tokens + P)``.
    """
    tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    if input_prompts is not None:
        n = vit.num_prefix_tokens
        prompts = input_prompts.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([tokens[:, :n], prompts, tokens[:, n:]], dim=1)
    prefixes = prefixes or {}
    for i, block in enumerate(vit.blocks):
        if i in prefixes:
            tokens = _prefixed_block(block, tokens, *prefixes[i])
        else:
            tokens = block(tokens)
    return vit.norm(tokens)
