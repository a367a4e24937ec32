"""AdaptFormer-style parallel MLP adapters on a timm ViT's blocks (APER, RanPAC, EASE).

The LAMDA codes (RevisitingCIL ``convs/vision_transformer_adapter.py``, RanPAC
``petl/vision_transformer_adapter.py``, CVPR24-Ease ``backbone/vit_ease.py``) add, in every
block, a bottleneck MLP that reads the block's *un-normalised* post-attention stream ``x`` and is
summed with the pretrained MLP's output::

    x = x + mlp(norm2(x)) + s · up(dropout(relu(down(x))))      s = 0.1, dropout 0.1

with ``down`` kaiming-uniform (a=√5), ``up`` and both biases zero ("lora" init, so a new adapter
leaves the network unchanged), no adapter LayerNorm.

timm's ``Block`` computes ``x + drop_path2(ls2(mlp(norm2(x))))``, so the MLP sees ``norm2(x)``,
not ``x``. Instead of forking the ViT, ``ParallelAdapterMLP`` replaces ``block.mlp`` and takes
over ``norm2`` and ``ls2`` (the same module objects, pretrained weights untouched), leaving
``block.norm2`` and ``block.ls2`` as identities: the block then computes exactly the line above.
Several adapters can live in one block (EASE: one per task); ``active`` picks the one used
(``None``: the plain pretrained block).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn import functional as F


class Adapter(nn.Module):
    """down (d→r) → ReLU → dropout → up (r→d), times a fixed scale; zero output at creation."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        self.dropout = dropout
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.dropout(F.relu(self.down(x)), p=self.dropout, training=self.training)
        return self.up(hidden) * self.scale


class ParallelAdapterMLP(nn.Module):
    """Stands in for ``block.mlp``: ``ls2(mlp(norm2(x))) + adapters[active](x)``."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, layer_scale: nn.Module):
        super().__init__()
        self.norm = norm
        self.mlp = mlp
        self.layer_scale = layer_scale
        self.adapters = nn.ModuleList()
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer_scale(self.mlp(self.norm(x)))
        if self.active is not None:
            out = out + self.adapters[self.active](x)
        return out


def install(vit: nn.Module) -> list[ParallelAdapterMLP]:
    """Wrap every block's MLP (no adapter yet); returns the wrappers in block order."""
    wrappers = []
    for block in vit.blocks:
        if not isinstance(block.drop_path2, nn.Identity):
            raise ValueError("parallel adapters need drop_path_rate 0 (as in the official codes)")
        wrapper = ParallelAdapterMLP(block.norm2, block.mlp, block.ls2)
        block.norm2, block.ls2, block.mlp = nn.Identity(), nn.Identity(), wrapper
        wrappers.append(wrapper)
    return wrappers


def add_adapters(wrappers: list[ParallelAdapterMLP], bottleneck: int, scale: float = 0.1,
                 dropout: float = 0.1) -> int:
    """Append one new adapter to every block (on the blocks' device) and activate it; returns
    its index."""
    for wrapper in wrappers:
        dim = wrapper.norm.normalized_shape[0]
        device = next(wrapper.mlp.parameters()).device
        wrapper.adapters.append(Adapter(dim, bottleneck, scale, dropout).to(device))
    index = len(wrappers[0].adapters) - 1
    set_active(wrappers, index)
    return index


def set_active(wrappers: list[ParallelAdapterMLP], index: int | None) -> None:
    for wrapper in wrappers:
        wrapper.active = index


@contextlib.contextmanager
def using(wrappers: list[ParallelAdapterMLP], index: int | None):
    """Temporarily run the backbone with adapter ``index`` (``None``: pretrained path)."""
    previous = wrappers[0].active if wrappers else None
    set_active(wrappers, index)
    try:
        yield
    finally:
        set_active(wrappers, previous)


def adapter_parameters(wrappers: list[ParallelAdapterMLP], index: int) -> list[nn.Parameter]:
    return [p for wrapper in wrappers for p in wrapper.adapters[index].parameters()]
