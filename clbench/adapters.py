"""Low-rank adapters on slices of a timm block's fused ``attn.qkv`` Linear, peft-style.

The pretrained ``qkv`` stays frozen and is kept as the same Parameter objects (so checkpoints can
omit it). Subclasses say what each adapted slice adds:

* ``slice_delta(x, target)``: the delta output for ``target`` in {"q", "k", "v"} (cheap low-rank
  products, never a dense d×d matrix); subclasses may override ``forward`` with a faster
  unmerged path computing the same function;
* ``slice_delta_weight(target)``: the same delta as a (d, d) weight, used to merge.

Merging is an explicit state, as in peft: ``merge()`` folds every delta into one (3d, d) weight,
after which the forward is a single ``F.linear`` costing exactly what the plain backbone does;
``unmerge()`` drops it. The core merges every module that has ``merge``/``unmerge`` when
evaluation starts and unmerges when it ends; nothing merges implicitly on ``.eval()``. The
merged weight is a separate tensor (the pretrained ``qkv.weight`` is never modified in place), so
unmerging is exact, and it is a snapshot: weights must not change while merged (training a
merged adapter raises).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from clbench.precision import exact

SLICE_INDEX = {"q": 0, "k": 1, "v": 2}


class QKVAdapter(nn.Module):
    def __init__(self, qkv: nn.Linear, targets: tuple[str, ...]):
        super().__init__()
        self.qkv = qkv
        self.qkv.requires_grad_(False)
        self.dim = qkv.in_features
        self.targets = tuple(targets)
        self._merged_weight: torch.Tensor | None = None

    # -- to implement
    def slice_delta(self, x: torch.Tensor, target: str) -> torch.Tensor | None:
        raise NotImplementedError

    def slice_delta_weight(self, target: str) -> torch.Tensor | None:
        raise NotImplementedError

    # -- merge state
    @property
    def merged(self) -> bool:
        return self._merged_weight is not None

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + every slice's delta, as one (3d, d) weight (computed, not cached; never under
        autocast: the merged weight is exact in the weights' dtype)."""
        weight = self.qkv.weight.detach().clone()
        with exact(weight.device):
            for target in self.targets:
                delta = self.slice_delta_weight(target)
                if delta is not None:
                    i = SLICE_INDEX[target] * self.dim
                    weight[i:i + self.dim] += delta.detach().to(weight.dtype)
        return weight

    def merge(self) -> None:
        """Enter the merged state with the current weights (again if already merged)."""
        self._merged_weight = self.merged_weight()

    def unmerge(self) -> None:
        self._merged_weight = None

    # -- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.merged_forward(x)
        return self.unmerged_forward(x)

    def merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("a merged adapter cannot train: call unmerge() first")
        return F.linear(x, self._merged_weight, self.qkv.bias)

    def unmerged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen qkv plus each slice's low-rank delta (the reference path)."""
        out = self.qkv(x)
        parts = list(out.split(self.dim, dim=-1))
        changed = False
        for target in self.targets:
            delta = self.slice_delta(x, target)
            if delta is not None:
                parts[SLICE_INDEX[target]] = parts[SLICE_INDEX[target]] + delta
                changed = True
        return torch.cat(parts, dim=-1) if changed else out


def install_qkv_adapters(vit: nn.Module, make_adapter) -> list[QKVAdapter]:
    """Replace ``block.attn.qkv`` of every block by ``make_adapter(block_index, qkv)``."""
    adapters = []
    for index, block in enumerate(vit.blocks):
        adapter = make_adapter(index, block.attn.qkv)
        block.attn.qkv = adapter
        adapters.append(adapter)
    return adapters


def mergeable(model: nn.Module) -> list[nn.Module]:
    """Every submodule with ``merge()`` and ``unmerge()`` (adapters of any method)."""
    return [m for m in model.modules()
            if callable(getattr(m, "merge", None)) and callable(getattr(m, "unmerge", None))]


@contextmanager
def merged(model: nn.Module):
    """Merge every mergeable submodule of ``model`` for the block (no-grad passes over data);
    those already merged by the caller stay merged afterwards."""
    entered = [m for m in mergeable(model) if not getattr(m, "merged", False)]
    for m in entered:
        m.merge()
    try:
        yield model
    finally:
        for m in entered:
            m.unmerge()
