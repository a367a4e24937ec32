"""SSF (Lian et al., "Scaling & Shifting Your Features", NeurIPS 2022) on a timm ViT, the other
first-session tuner of the LAMDA codes (RevisitingCIL ``convs/vision_transformer_ssf.py``,
RanPAC ``petl/vision_transformer_ssf.py``; RanPAC's ImageNet-R/A runs use it).

A learnable per-channel scale γ ~ N(1, 0.02) and shift β ~ N(0, 0.02) follow, as in the official
ViT: the patch projection, every block's ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``, and the final ``norm``. ``ScaleShift`` wraps those modules (same
pretrained module objects, untouched) instead of forking the ViT; ``enabled=False`` gives the
plain pretrained path (APER's first branch).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class ScaleShift(nn.Module):
    """``module(x) · γ + β`` over the output channels (the last dim, or dim 1 of a conv map)."""

    def __init__(self, module: nn.Module, channels: int):
        super().__init__()
        self.module = module
        self.scale = nn.Parameter(torch.empty(channels).normal_(mean=1.0, std=0.02))
        self.shift = nn.Parameter(torch.empty(channels).normal_(std=0.02))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if not self.enabled:
            return out
        if out.dim() == 4:  # the patch projection's (B, C, H, W) map
            return out * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return out * self.scale + self.shift


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.normalized_shape[0]


def install(vit: nn.Module) -> list[ScaleShift]:
    """Wrap the official SSF positions; returns the wrappers."""
    places = [(vit.patch_embed, "proj")]
    for block in vit.blocks:
        places += [(block, "norm1"), (block.attn, "qkv"), (block.attn, "proj"), (block, "norm2"),
                   (block.mlp, "fc1"), (block.mlp, "fc2")]
    places.append((vit, "norm"))
    device = next(vit.parameters()).device
    wrappers = []
    for owner, name in places:
        wrapper = ScaleShift(getattr(owner, name), _channels(getattr(owner, name))).to(device)
        setattr(owner, name, wrapper)
        wrappers.append(wrapper)
    return wrappers


def parameters(wrappers: list[ScaleShift]) -> list[nn.Parameter]:
    return [p for w in wrappers for p in (w.scale, w.shift)]


@contextlib.contextmanager
def disabled(wrappers: list[ScaleShift]):
    """Temporarily run the plain pretrained backbone."""
    for w in wrappers:
        w.enabled = False
    try:
        yield
    finally:
        for w in wrappers:
            w.enabled = True
