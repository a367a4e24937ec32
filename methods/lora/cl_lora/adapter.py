"""CL-LoRA's two adapters on a block's fused qkv (q and v slices, no scaling), and the ViT passes
that run the shared blocks once and the task-specific blocks once per task branch.

* ``SharedLoRA`` (early blocks): a fixed random orthogonal down-projection per slice, one
  up-projection per slice trained across all tasks, and a frozen snapshot of the up-projections
  at the end of the previous task (the distillation teacher).
* ``SpecificLoRA`` (later blocks): one (down, up, block weights) set per task; only the current
  task's trains, old ones are frozen. ``active`` picks the task branch the forward uses.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from clbench.adapters import SLICE_INDEX, QKVAdapter

TARGETS = ("q", "v")  # official msa = [1, 0, 1]


def random_orthogonal(dim: int, rank: int, like: torch.Tensor) -> torch.Tensor:
    """(rank, dim) rows with orthonormal columns' transpose: Q of a QR of a U[0, 1) dim × rank
    matrix, transposed (the official ``Adapter_lora`` down-projection init)."""
    q, _ = torch.linalg.qr(torch.rand(dim, rank, dtype=torch.float64))
    return q.T.to(like)


class SharedLoRA(QKVAdapter):
    def __init__(self, qkv: nn.Linear, rank: int):
        super().__init__(qkv, TARGETS)
        kw = dict(device=qkv.weight.device, dtype=qkv.weight.dtype)
        for t in TARGETS:
            self.register_buffer(f"down_{t}", random_orthogonal(self.dim, rank, qkv.weight))
            setattr(self, f"up_{t}", nn.Parameter(torch.zeros(self.dim, rank, **kw)))
            self.register_buffer(f"old_up_{t}", torch.zeros(self.dim, rank, **kw))
        self.teacher = False  # True: the previous task's up-projections (distillation teacher)

    def up(self, target: str) -> torch.Tensor:
        return getattr(self, f"old_up_{target}" if self.teacher else f"up_{target}")

    def slice_delta(self, x, target):
        return F.linear(F.linear(x, getattr(self, f"down_{target}")), self.up(target))

    def slice_delta_weight(self, target):
        return self.up(target) @ getattr(self, f"down_{target}")

    def ups(self) -> list[nn.Parameter]:
        return [getattr(self, f"up_{t}") for t in TARGETS]

    @torch.no_grad()
    def snapshot(self) -> None:
        for t in TARGETS:
            getattr(self, f"old_up_{t}").copy_(getattr(self, f"up_{t}"))

    def reassignment_weights(self, target: str) -> torch.Tensor | None:
        """Row weights of the gradient reassignment: the teacher up-projection's row norms,
        rescaled to mean 1 (``None`` when they are all zero: no direction to reassign by)."""
        norms = torch.linalg.vector_norm(getattr(self, f"old_up_{target}").double(), dim=1)
        total = norms.sum()
        return None if total == 0 else norms * (len(norms) / total)


class SpecificLoRA(QKVAdapter):
    def __init__(self, qkv: nn.Linear, rank: int):
        super().__init__(qkv, TARGETS)
        self.rank = rank
        self.downs_q, self.downs_v = nn.ParameterList(), nn.ParameterList()
        self.ups_q, self.ups_v = nn.ParameterList(), nn.ParameterList()
        self.scales = nn.ParameterList()  # (3,) per task: q, k (unused, as official), v
        self.active = -1

    @property
    def n_tasks(self) -> int:
        return len(self.scales)

    def add_task(self) -> None:
        """A new branch: random orthogonal downs, zero ups, block weights U(0.5, 1.5); the
        previous branches freeze."""
        w = self.qkv.weight
        for p in self.parameters():
            p.requires_grad_(False)
        for t in TARGETS:
            getattr(self, f"downs_{t}").append(nn.Parameter(random_orthogonal(self.dim, self.rank, w)))
            getattr(self, f"ups_{t}").append(nn.Parameter(w.new_zeros(self.dim, self.rank)))
        self.scales.append(nn.Parameter(w.new_empty(3).uniform_(0.5, 1.5)))
        self.active = self.n_tasks - 1

    def current(self) -> list[nn.Parameter]:
        return [self.downs_q[-1], self.downs_v[-1], self.ups_q[-1], self.ups_v[-1], self.scales[-1]]

    def _pair(self, target):
        return getattr(self, f"downs_{target}")[self.active], getattr(self, f"ups_{target}")[self.active]

    def slice_delta(self, x, target):
        down, up = self._pair(target)
        return self.scales[self.active][SLICE_INDEX[target]] * F.linear(F.linear(x, down), up)

    def slice_delta_weight(self, target):
        down, up = self._pair(target)
        return self.scales[self.active][SLICE_INDEX[target]] * (up @ down)

    def select(self, task: int) -> None:
        """Use branch ``task``; a merged adapter re-merges with it (cheap: rank-r products)."""
        self.active = task
        if self.merged:
            self.merge()


# ----------------------------------------------------------------- ViT passes
def tokens(vit, x: torch.Tensor) -> torch.Tensor:
    """timm ``forward_features`` up to the first block."""
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


def pooled(vit, h: torch.Tensor) -> torch.Tensor:
    """Final norm and timm's pooling (the class token for the official backbones)."""
    return vit.forward_head(vit.norm(h), pre_logits=True)


def run_blocks(vit, h: torch.Tensor, blocks: range) -> torch.Tensor:
    for i in blocks:
        h = vit.blocks[i](h)
    return h


@contextmanager
def teacher_view(shared: list[SharedLoRA]):
    """The shared adapters as they were at the end of the previous task."""
    for a in shared:
        a.teacher = True
    try:
        yield
    finally:
        for a in shared:
            a.teacher = False
