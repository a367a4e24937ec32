"""Checkpoints hold exactly what differs from the pretrained weights, whatever the method wraps."""
from __future__ import annotations

import torch

from clbench.registry import METHODS
from helpers import build, tiny_vit


def test_wrapped_pretrained_weights_are_left_out_until_they_change():
    strategy = build(METHODS.get("sdlora"), tiny_vit())  # wraps every qkv: its keys are renamed
    qkv = strategy.model.backbone.blocks[0].attn.qkv.qkv.weight
    saved = strategy.checkpoint()["model"]
    assert not any(key.startswith("backbone.") and key.endswith((".qkv.weight", "mlp.fc1.weight"))
                   for key in saved)
    assert any(".slices." in key for key in saved)  # the method's own tensors are there
    with torch.no_grad():
        qkv[0, 0] += 1.0  # a method that edits a pretrained weight in place
    changed = strategy.checkpoint()["model"]
    assert [k for k in changed if k not in saved] == ["backbone.blocks.0.attn.qkv.qkv.weight"]
    fresh = build(METHODS.get("sdlora"), tiny_vit())
    fresh.load_checkpoint({"model": changed, "state": strategy.extra_state()})
    assert torch.equal(fresh.model.backbone.blocks[0].attn.qkv.qkv.weight, qkv)
