"""SD-LoRA states built directly on the adapter (no Avalanche): a backbone + head, the adapter
state at the start of any task with earlier pairs trained to random values, and a swappable state
so two task counts can be timed on one backbone. Used by ``clbench perf`` (section 3) and by
``scripts/perf_sdlora.py``."""
from __future__ import annotations

import torch
from torch import nn


def adapter_class():
    """SD-LoRA's adapter. The one place perf names the module that holds it."""
    from clbench.methods.lora.sdlora.adapter import DecoupledLoRA

    return DecoupledLoRA


class Net(nn.Module):
    """Backbone + linear head, the shape of clbench's CLModel without its Avalanche imports."""

    def __init__(self, backbone, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, n_classes)
        self.known = 0

    def forward(self, x):
        return self.head(self.backbone(x))


def advance(model: Net, tasks: int, rank: int, classes_per_task: int):
    """SD-LoRA state at the start of task ``tasks`` (0-based): earlier pairs trained (random B)."""
    lora = adapter_class()(model)
    model.add_module("sdlora_magnitudes", lora.magnitudes)  # moves with the model
    generator = torch.Generator().manual_seed(0)
    for task in range(tasks + 1):
        lora.begin_task(task, rank, "factor_product", reset_magnitudes=True, init=0.8)
        if task < tasks:
            for s in lora.slices():
                s.B_cur.data.copy_(0.01 * torch.randn(s.B_cur.shape, generator=generator))
            lora.end_task(None, "factor_product")
    model.known = tasks * classes_per_task
    return lora


def lora_parameter_count(lora) -> int:
    pairs = sum(s.A_cur.numel() + s.B_cur.numel() for s in lora.slices())
    return pairs + lora.magnitudes.alpha.numel()


class State:
    """An SD-LoRA state (per-block slices, magnitudes, head) that can be swapped into one backbone,
    so both measurements run on the same weights in the same memory (separate model copies
    differed by several percent on CPU for identical work)."""

    def __init__(self, model: Net, lora):
        self.slices = [adapter.slices for adapter in lora.adapters]
        self.magnitudes = lora.magnitudes
        self.head = model.head
        self.known = model.known
        self.lora = lora
        params = [p for s in lora.slices() for p in (s.A_cur, s.B_cur)]
        self.optimizer = torch.optim.SGD([*params, lora.magnitudes.alpha, *model.head.parameters()],
                                         lr=1e-4, momentum=0.9)

    def use(self, model: Net, adapters) -> None:
        for adapter, slices in zip(adapters, self.slices):
            adapter.slices = slices
            object.__setattr__(adapter, "magnitudes", self.magnitudes)
            adapter.unmerge()  # a swapped-in state must not use a stale merged weight
        model.head = self.head
        model.known = self.known
