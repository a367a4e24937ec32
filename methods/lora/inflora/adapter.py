"""InfLoRA's adapter on a block's fused qkv: a designed, frozen down-projection shared by the k
and v slices, trained up-projections, and the finished tasks' branches folded into one delta."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from clbench.adapters import SLICE_INDEX, QKVAdapter
from clbench.precision import exact


class InfLoRAAdapter(QKVAdapter):
    """k/v branches of one block: frozen designed ``down`` (shared), trained ``up_k``/``up_v``,
    and ``old_delta`` = the folded sum of finished tasks' branches (2 × D × D: k, v)."""

    def __init__(self, qkv: nn.Linear, rank: int):
        super().__init__(qkv, ("k", "v"))
        d, kw = self.dim, dict(device=qkv.weight.device, dtype=qkv.weight.dtype)
        self.register_buffer("down", torch.zeros(rank, d, **kw))
        self.up_k = nn.Parameter(torch.zeros(d, rank, **kw))
        self.up_v = nn.Parameter(torch.zeros(d, rank, **kw))
        self.register_buffer("old_delta", torch.zeros(2, d, d, **kw))

    def _up(self, target: str) -> nn.Parameter:
        return self.up_k if target == "k" else self.up_v

    def slice_delta_weight(self, target: str) -> torch.Tensor:
        return self.old_delta[SLICE_INDEX[target] - 1] + self._up(target) @ self.down

    def slice_delta(self, x: torch.Tensor, target: str) -> torch.Tensor:
        old = F.linear(x, self.old_delta[SLICE_INDEX[target] - 1])
        return old + F.linear(F.linear(x, self.down), self._up(target))

    def unmerged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One linear with W + the folded old deltas (a d×3d add per call, negligible next to the
        token matmul, and nothing cached that could go stale), plus the current branch."""
        frozen = self.qkv.weight.detach().clone()
        frozen[self.dim:] += self.old_delta.reshape(2 * self.dim, self.dim)
        q, k, v = F.linear(x, frozen, self.qkv.bias).split(self.dim, dim=-1)
        h = F.linear(x, self.down)
        return torch.cat([q, k + F.linear(h, self.up_k), v + F.linear(h, self.up_v)], dim=-1)

    @torch.no_grad()
    def start_task(self, down: torch.Tensor) -> None:
        self.down.copy_(down)
        self.up_k.zero_()
        self.up_v.zero_()

    @torch.no_grad()
    def fold(self) -> None:
        """Freeze the finished branch into ``old_delta`` (same function, flat cost; exact, so
        never under autocast)."""
        with exact(self.down.device):
            self.old_delta[0] += self.up_k @ self.down
            self.old_delta[1] += self.up_v @ self.down
        self.up_k.zero_()
        self.up_v.zero_()
