"""The base class's own mechanics: autocast never outlives a failed forward pass."""
from __future__ import annotations

import pytest
import torch

from clbench.context import RunContext
from clbench.registry import METHODS
from helpers import build, tensor_stream, tiny_vit


def test_an_exception_in_a_bf16_step_leaves_no_autocast_behind():
    strategy = build(METHODS.get("linear-probe"), tiny_vit(), n_tasks=2, epochs=1)
    strategy.context = RunContext.for_backbone(strategy.model.backbone, n_tasks=2, precision="bf16")

    def broken_loss():
        raise RuntimeError("broken extra loss")

    strategy.extra_loss = broken_loss
    with pytest.raises(RuntimeError, match="broken extra loss"):
        strategy.train(tensor_stream(4, 2, 4).train[0])
    assert not torch.is_autocast_enabled("cpu")
    assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
