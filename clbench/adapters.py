"""Low-rank adapters on slices of a timm block's fused ``attn.qkv`` Linear, peft-style.

The pretrained ``qkv`` stays frozen and is kept as the same Parameter objects (so checkpoints can
omit it). Subclasses say what each adapted slice adds:

* ``slice_delta(x, target)``: the delta output for ``target`` in {"q", "k", "v"} during training
  (cheap low-rank products, never a dense d×d matrix);
* ``slice_delta_weight(target)``: the same delta as a (d, d) weight, used to merge.

In eval mode the forward is one ``F.linear`` with the merged weight, computed once and cached
until the module goes back to training, so inference costs exactly what the plain backbone does.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SLICE_INDEX = {"q": 0, "k": 1, "v": 2}


class QKVAdapter(nn.Module):
    def __init__(self, qkv: nn.Linear, targets: tuple[str, ...]):
        super().__init__()
        self.qkv = qkv
        self.qkv.requires_grad_(False)
        self.dim = qkv.in_features
        self.targets = tuple(targets)
        self._merged: torch.Tensor | None = None

    # -- to implement
    def slice_delta(self, x: torch.Tensor, target: str) -> torch.Tensor | None:
        raise NotImplementedError

    def slice_delta_weight(self, target: str) -> torch.Tensor | None:
        raise NotImplementedError

    # -- shared machinery
    def merged_weight(self) -> torch.Tensor:
        weight = self.qkv.weight.detach().clone()
        for target in self.targets:
            delta = self.slice_delta_weight(target)
            if delta is not None:
                i = SLICE_INDEX[target] * self.dim
                weight[i:i + self.dim] += delta.detach().to(weight.dtype)
        return weight

    def invalidate(self) -> None:
        self._merged = None

    def train(self, mode: bool = True):
        self._merged = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if self._merged is None:
                self._merged = self.merged_weight()
            return F.linear(x, self._merged, self.qkv.bias)
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
