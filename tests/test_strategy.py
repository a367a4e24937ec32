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


def test_uint8_images_reach_the_backbone_as_exactly_totensors_values():
    """Image loaders deliver PILToTensor's uint8; the model must see ToTensor's float32 bits."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from clbench.model import CLModel
    from helpers import DIM

    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pixels.reshape(-1)[:256] = np.arange(256)  # every value at least once
    image = Image.fromarray(pixels)
    as_uint8, as_float = T.PILToTensor()(image)[None], T.ToTensor()(image)[None]
    assert as_uint8.dtype == torch.uint8
    for mean, std in ((None, None), ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))):
        model = CLModel(tiny_vit(), DIM, mean, std)
        assert torch.equal(model.normalize(as_uint8), model.normalize(as_float))
        assert torch.equal(model.features(as_uint8), model.features(as_float))


def test_parameters_folded_away_after_a_task_are_still_counted_as_trained():
    """A plugin that merges its adapter into the backbone in ``after_task`` (nothing trainable is
    left when the runner records the task) is recorded with what its optimiser updated."""
    from torch import nn

    from clbench.strategy import CLStrategy

    class FoldingAdapter(CLStrategy):
        def prepare_model(self, model):
            model.backbone.requires_grad_(False)
            self.delta = nn.Parameter(torch.zeros(model.head.in_features))

        def trainable_parameters(self):
            return [self.delta, *self.model.head.parameters()] if self.delta.requires_grad else \
                list(self.model.head.parameters())

        def after_task(self, task):
            self.delta.requires_grad_(False)  # "folded into the backbone"

    strategy = build(FoldingAdapter, tiny_vit(), n_tasks=2, epochs=1)
    strategy.train(tensor_stream(4, 2, 4).train[0])
    head = sum(p.numel() for p in strategy.model.head.parameters())
    assert strategy.trainable_parameter_count() == head  # what is left now
    assert strategy.trained_parameter_count == head + strategy.delta.numel()  # what trained


def test_method_state_is_added_explicitly_and_saved_with_the_model():
    from torch import nn

    from clbench.model import CLModel
    from helpers import DIM

    model = CLModel(tiny_vit(), DIM)
    model.add_state("prompt", nn.Parameter(torch.ones(3)))
    model.add_state("tii", nn.Linear(2, 2))
    assert {"prompt", "tii.weight", "tii.bias"} <= set(model.state_dict())
    for taken in ("head", "backbone", "prompt"):
        with pytest.raises(ValueError, match="already has"):
            model.add_state(taken, nn.Linear(1, 1))
