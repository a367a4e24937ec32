"""Per-task adapters trained one after the other, with class Gaussians for classifier alignment:
what MOS and TUNA share on EASE's parallel adapters.

Both official codes (sun-hailong/AAAI25-MOS ``backbone/vit_mos.py``, LAMDA-CL/ICCV2025-TUNA
``backbone/vit_tuna.py``) keep one trainable ``cur_adapter`` that is copied into the list of task
adapters after each task and trained on in the next one, never re-initialised: task t's adapter
starts from task t − 1's. Here every task has its own slot in the family's
``ParallelAdapterMLP`` (old slots frozen), filled with a copy of the previous task's slot when
it is created. After a task, one pass over the task's training images under the test transform
(``statistics_loader``) gives each new class's mean and covariance (``clbench.alignment``), from
which the head is later realigned.

Recipes, sources and deviations: docs/methods/prototype.md
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from clbench.alignment import AlignmentOptions, ClassGaussians
from clbench.errors import UsageError
from clbench.methods.prototype import parallel_adapter
from clbench.methods.prototype.base import PrototypeStrategy
from clbench.methods.prototype.first_session import AdapterConfig
from clbench.precision import exact

COVARIANCES = ("full", "diagonal")


@dataclass
class TaskAdapterConfig(AlignmentOptions, AdapterConfig):
    """``ca_*``: the alignment stage (``clbench.alignment``), here with the codes' values:
    ``ca_samples`` = 5 × batch size, no logit normalisation; ``ca_covariance``: ``"diagonal"``
    keeps only the variances (the codes' ``ca_storage_efficient_method="variance"``)."""

    lr_scaled_fields: ClassVar[tuple[str, ...]] = ("ca_lr",)
    ffn_num: int = 16
    ca_epochs: int = 30
    ca_lr: float = 0.005
    ca_samples: int = 240
    ca_temperature: float = 0.0
    ca_covariance: str = "full"

    def __post_init__(self):
        super().__post_init__()
        if self.ca_covariance not in COVARIANCES:
            raise UsageError(f"ca_covariance={self.ca_covariance!r}: choose 'full' or 'diagonal'")


class UnscaledGaussians(ClassGaussians):
    """Class Gaussians sampled at their own means (no SLCA shrink), as MOS samples them."""

    def mean_scale(self, c: int, task: int) -> float:
        return 1.0


class TaskAdapterStrategy(PrototypeStrategy):
    """One adapter slot per task from ``first_slot`` on (slots before it are the method's own,
    e.g. TUNA's universal adapter); class Gaussians of every class from its task's adapter."""

    Config = TaskAdapterConfig
    first_slot = 0

    def prepare_model(self, model) -> None:
        model.backbone.requires_grad_(False)
        self.adapters = parallel_adapter.install(model.backbone)
        self.gaussians = self.make_gaussians(model.head.in_features)

    def make_gaussians(self, dim: int) -> ClassGaussians:
        return ClassGaussians(dim, self.config.cov_ridge)

    def epochs_for_task(self, task: int) -> int:
        return self.config.epochs

    def slot(self, task: int) -> int:
        return self.first_slot + task

    @property
    def n_slots(self) -> int:
        return len(self.adapters[0].adapters)

    def add_slot(self) -> int:
        """A new adapter slot (active), every older one frozen."""
        cfg = self.config
        for index in range(self.n_slots):
            for p in parallel_adapter.adapter_parameters(self.adapters, index):
                p.requires_grad_(False)
        return parallel_adapter.add_adapters(self.adapters, cfg.ffn_num, cfg.adapter_scale,
                                             cfg.adapter_dropout)

    def before_task(self, task: int) -> None:
        index = self.add_slot()
        if index > self.first_slot:  # the codes' cur_adapter goes on from the previous task's
            with torch.no_grad():
                for wrapper in self.adapters:
                    previous = wrapper.adapters[index - 1].state_dict()
                    wrapper.adapters[index].load_state_dict(previous)

    def task_adapter_parameters(self, task: int):
        return parallel_adapter.adapter_parameters(self.adapters, self.slot(task))

    def adapter_features(self, images, index: int | None):
        with parallel_adapter.using(self.adapters, index):
            return self.model.features(images)

    @torch.no_grad()
    def gather(self, slots: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """This rank's float64 features of the task's training images (test transform, eval
        mode, full precision) through each adapter slot in ``slots``, and their labels."""
        was_training = self.model.training
        self.model.eval()
        features, labels = [[] for _ in slots], []
        try:
            for batch in self.statistics_loader(self.config.stats_transform):
                images = batch[0].to(self.device, non_blocking=True)
                with exact(self.device):
                    for out, index in zip(features, slots):
                        out.append(self.adapter_features(images, index).double())
                labels.append(batch[1].to(self.device))
        finally:
            self.model.train(was_training)
        return [torch.cat(f) for f in features], torch.cat(labels)

    def add_gaussians(self, features: torch.Tensor, labels: torch.Tensor, task: int) -> None:
        start = len(self.gaussians)
        self.gaussians.add(features, labels, self.new_classes, task)
        if self.config.ca_covariance == "diagonal":
            covs = self.gaussians.covs
            covs[start:] = torch.diag_embed(torch.diagonal(covs[start:], dim1=1, dim2=2))

    def after_task(self, task: int) -> None:
        for p in self.task_adapter_parameters(task):
            p.requires_grad_(False)

    @contextlib.contextmanager
    def alignment_draws(self, task: int):
        """The alignment's samples from the random stream seeded by (run seed, task): the same
        on every data-parallel rank (whose dropout draws differ) and after a resume."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1000 + task)
            yield

    def stored(self) -> dict:
        """What the method keeps besides the pretrained backbone: adapter and head parameters,
        and the numbers in its class statistics (means and d × d covariances)."""
        adapters = sum(p.numel() for index in range(self.n_slots)
                       for p in parallel_adapter.adapter_parameters(self.adapters, index))
        return {"stored_adapter_params": adapters,
                "stored_head_params": sum(p.numel() for p in self.model.head.parameters()),
                "stored_statistics": self.gaussians.means.numel() + self.gaussians.covs.numel()}

    def task_info(self) -> dict:
        return {"task_adapters": self.task + 1, "forward_passes": self.forward_passes_per_image,
                **self.stored()}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "adapter_slots": self.n_slots,
                "gaussians": self.gaussians.state_dict()}

    def restore_structure(self, state: dict) -> None:
        super().restore_structure(state)
        while self.n_slots < state["adapter_slots"]:
            self.add_slot()
        for index in range(self.n_slots):  # a checkpoint exists only between tasks
            for p in parallel_adapter.adapter_parameters(self.adapters, index):
                p.requires_grad_(False)
        self.gaussians.load_state_dict(state["gaussians"])
