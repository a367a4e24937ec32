"""Prompt and prefix injection into timm's own ``VisionTransformer``, shared by L2P, L2P++ and
CODA-Prompt. No forked ViT: the pretrained blocks are used as they are, and nothing is patched.

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

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from clbench.errors import UsageError
from clbench.hparams import TrainConfig
from clbench.strategy import CLStrategy, cosine_per_epoch


def check_promptable(vit, prefix_blocks=()) -> None:
    """Fail early if the model is not a timm ViT whose prefixed blocks are plain ``Block``s."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"prompting needs a timm VisionTransformer, got {type(vit).__name__}")
    for i in prefix_blocks:
        block = vit.blocks[i]
        if type(block) is not Block or type(block.attn) is not Attention:
            raise TypeError(f"prefix tuning supports timm Block/Attention, block {i} is "
                            f"{type(block).__name__}/{type(block.attn).__name__}")
        if getattr(block.attn, "gate", None) is not None:
            raise TypeError("prefix tuning does not support gated attention")


def clamp_blocks(blocks, depth: int) -> list[int]:
    """Keep the requested block indices that exist in a ``depth``-block model (e.g. CODA's
    blocks 0-4 become 0-3 on the 4-block tiny ViT); callers record the result."""
    kept = sorted({int(b) for b in blocks if 0 <= int(b) < depth})
    if not kept:
        raise ValueError(f"none of the prompt blocks {list(blocks)} exists in a {depth}-block ViT")
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


# --------------------------------------------------------------------------- strategy glue
# What L2P, L2P++ and CODA-Prompt share as training recipes: the query pass (optionally cached),
# Adam, the official per-epoch cosine or a constant rate, optional gradient clipping.


@dataclass
class PromptConfig(TrainConfig):
    schedule: str = "cosine"  # "cosine" (CODA/InfLoRA per-epoch formula) or "constant"
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    # Reuse each training image's query feature after its first epoch. Exact only when the
    # training transform is deterministic (true for `digits`; false with random crops/flips,
    # where the official codes recompute the query for every augmented view).
    cache_queries: bool = False


class IndexedItems(Dataset):
    """A dataset view whose items carry their position: (x, y, index, task label)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, y, *rest = self.dataset[index]
        return (x, y, index, *rest)


class QueryCache:
    """Query features of the current task's training images, stored by dataset position."""

    def __init__(self, size: int = 0):
        self.features: torch.Tensor | None = None
        self.known = torch.zeros(size, dtype=torch.bool)

    def lookup(self, index: torch.Tensor, x: torch.Tensor, compute) -> torch.Tensor:
        index = index.cpu()
        missing = ~self.known[index]
        if bool(missing.any()):
            fresh = compute(x[missing.to(x.device)])
            if self.features is None:
                self.features = fresh.new_zeros(len(self.known), fresh.shape[1])
            self.features[index[missing].to(fresh.device)] = fresh
            self.known[index[missing]] = True
        return self.features[index.to(self.features.device)]


class PromptStrategy(CLStrategy):
    """Base of the prompt methods: frozen backbone, one extra no-grad query pass per image."""

    Config = PromptConfig
    forward_passes_per_image = 2  # the frozen query pass + the prompted pass
    backbone_frozen = True
    optimizer_name = "adam"

    def query(self) -> torch.Tensor:
        """q(x) for the current mini-batch, from the cache when enabled and training."""
        model = self.model
        compute = lambda x: query_features(model.backbone, model.normalize(x))  # noqa: E731
        if self.is_training and self.config.cache_queries:
            return self._query_cache.lookup(self.mbatch[2], self.mb_x, compute)
        return compute(self.mb_x)

    def make_train_dataloader(self, **kwargs):
        if self.config.cache_queries:
            self.adapted_dataset = IndexedItems(self.adapted_dataset)
            self._query_cache = QueryCache(len(self.adapted_dataset))
        super().make_train_dataloader(**kwargs)

    def prepare_model(self, model) -> None:
        if self.config.schedule not in ("cosine", "constant"):
            raise UsageError(f"schedule must be 'cosine' or 'constant', got {self.config.schedule!r}")
        model.backbone.requires_grad_(False)

    def make_scheduler_for_task(self, optimizer):
        return cosine_per_epoch(optimizer, self.config.epochs) if self.config.schedule == "cosine" else None

    def optimizer_step(self):
        if self.config.grad_clip > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        super().optimizer_step()
