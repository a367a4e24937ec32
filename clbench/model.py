"""The model every method trains: a timm backbone (``num_classes=0``), the input normalisation
and the class-incremental head.

Images arrive as uint8 pixels (the loaders' transforms end in ``PILToTensor``, a quarter of the
bytes of float32 through shared memory and the host-to-device copy); ``CLModel.normalize`` turns
them into ToTensor's [0, 1] floats on the device, bit-identical on every device, then applies the
backbone's mean/std. The head grows each task by copying its old rows into a larger layer.
"""
from __future__ import annotations

import torch
from torch import nn


class IncrementalHead(nn.Module):
    """Linear head over all classes seen so far; grows by copying old rows into a larger layer."""

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.fc = nn.Linear(in_features, 0)

    @property
    def n_classes(self) -> int:
        return self.fc.out_features

    def grow(self, n_new: int) -> None:
        old = self.fc
        new = nn.Linear(self.in_features, old.out_features + n_new).to(old.weight.device)
        # SD-LoRA's SimpleLinear init (also fine for the others): kaiming-uniform, zero bias.
        nn.init.kaiming_uniform_(new.weight, nonlinearity="linear")
        nn.init.zeros_(new.bias)
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.fc = new

    def resize(self, n_classes: int) -> None:
        if n_classes > self.n_classes:
            self.grow(n_classes - self.n_classes)

    def squared_norm_from(self, first: int) -> torch.Tensor:
        """‖W[first:]‖² + ‖b[first:]‖²: weight decay on the current task's rows only, as the
        official codes that freeze old heads apply it (InfLoRA, SLCA)."""
        return self.fc.weight[first:].pow(2).sum() + self.fc.bias[first:].pow(2).sum()

    def forward(self, features):
        return self.fc(features)


# ToTensor's value of every uint8 pixel (float32 x/255, computed once on the CPU). Looking pixels
# up gives the same bits on every device, where a device's own division may not (CUDA divides by
# a scalar as a multiplication by its reciprocal).
PIXEL_VALUES = torch.arange(256, dtype=torch.float32).div(255)


class CLModel(nn.Module):
    """Backbone (timm ViT, ``num_classes=0``) + input normalisation + incremental head."""

    def __init__(self, backbone: nn.Module, feature_dim: int, mean=None, std=None):
        super().__init__()
        self.backbone = backbone
        self.head = IncrementalHead(feature_dim)
        self.register_buffer("pixel_values", PIXEL_VALUES.clone(), persistent=False)
        self.normalize_input = mean is not None
        if self.normalize_input:
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x):
        """The backbone's input: uint8 pixels (what image loaders deliver) become ToTensor's
        [0, 1] floats here, on the device; then the backbone's mean/std, if it has one."""
        if x.dtype == torch.uint8:
            x = self.pixel_values.index_select(0, x.flatten().int()).view(x.shape)
        return (x - self.mean) / self.std if self.normalize_input else x

    def add_state(self, name: str, value: nn.Module | nn.Parameter) -> None:
        """Register a method's own module or parameter (prompts, a task-identity head, shared
        magnitudes): it moves with the model and is saved in every checkpoint under ``name``.
        The one way a method adds state, so a reader of the method sees what is checkpointed."""
        if name in ("backbone", "head") or hasattr(self, name):
            raise ValueError(f"CLModel already has {name!r}: choose another name")
        if isinstance(value, nn.Parameter):
            self.register_parameter(name, value)
        else:
            self.register_module(name, value)

    def features(self, x):
        return self.backbone(self.normalize(x))

    def forward(self, x):
        return self.head(self.features(x))
