"""The prototype family's base (SimpleCIL, APER, RanPAC, EASE; the coming MOS, TUNA, SLCA).

``PrototypeStrategy``: tasks learnt without gradient steps (``epochs_for_task == 0`` builds no
optimiser), class statistics in float64 sums through ``clbench.class_stats`` from the training
images under the test transform, first-session SGD + cosine annealing as in the LAMDA codes.
``CosineHead`` is the codes' ``CosineLinear`` (learnable σ); ``ClassMeanPrototypes`` keeps
class-mean prototypes with their checkpoint state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from clbench.class_stats import ClassStatistics, StatisticsOptions, collect
from clbench.hparams import TrainConfig
from clbench.model import IncrementalHead
from clbench.precision import exact
from clbench.strategy import CLStrategy


class CosineHead(IncrementalHead):
    """σ·cos(x, w_c) over all classes so far (the LAMDA codes' ``CosineLinear``: rows
    uniform(±1/√d), σ learnable, init 1). Each task's rows are a separate Parameter so a method
    that trains only the current task's rows (EASE's ``proxy_fc``) counts only those."""

    def __init__(self, in_features: int):
        super().__init__(in_features)
        del self.fc
        self.blocks = nn.ParameterList()
        self.sigma = nn.Parameter(torch.ones(1))

    @property
    def n_classes(self) -> int:
        return sum(block.shape[0] for block in self.blocks)

    def grow(self, n_new: int) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        device = self.sigma.device
        self.blocks.append(nn.Parameter(torch.empty(n_new, self.in_features, device=device)
                                        .uniform_(-bound, bound)))

    def start_task(self) -> None:
        """A fresh proxy classifier for the task whose rows were just grown (EASE's
        ``proxy_fc``): σ back to 1, the earlier tasks' rows frozen."""
        with torch.no_grad():
            self.sigma.fill_(1.0)
        for block in self.blocks[:-1]:
            block.requires_grad_(False)

    def forward(self, features):
        weight = torch.cat(list(self.blocks)) if len(self.blocks) else \
            features.new_zeros(0, self.in_features)
        return self.sigma * F.linear(F.normalize(features, dim=1), F.normalize(weight, dim=1))


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """cos(feature, prototype) for every class, in float32 outside autocast."""
    with exact(features.device):
        return F.normalize(features.float(), dim=1) @ F.normalize(
            prototypes.to(features.device, torch.float32), dim=1).T


@dataclass
class PrototypeConfig(StatisticsOptions, TrainConfig):
    """Shared by the LAMDA family: ``epochs``/``lr``/``batch_size`` are the first-session
    recipe (``tuned_epoch``, ``init_lr``, ``batch_size``), SGD momentum 0.9 with
    ``weight_decay`` and CosineAnnealingLR(T_max=epochs, eta_min=min_lr); ``stats_transform``
    as in ``clbench.class_stats``."""

    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 48
    weight_decay: float = 5e-4
    min_lr: float = 0.0


class PrototypeStrategy(CLStrategy):
    """Base of SimpleCIL/APER/RanPAC/EASE: tasks with ``epochs_for_task == 0`` build no real
    optimiser and run no epoch; ``after_task`` collects statistics from
    ``statistics_loader`` (the task's training images under the test transform)."""

    Config = PrototypeConfig

    def epochs_for_task(self, task: int) -> int:
        return 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def make_optimizer_for_task(self, params):  # called only when a task trains by gradient
        return torch.optim.SGD(params, lr=self.config.lr, momentum=0.9,
                               weight_decay=self.config.weight_decay)

    def make_scheduler_for_task(self, optimizer):
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=self.epochs_for_task(self.task), eta_min=self.config.min_lr)

    def extra_state(self) -> dict:
        state = super().extra_state()
        if isinstance(self.model.head, CosineHead):
            state["head_blocks"] = [int(block.shape[0]) for block in self.model.head.blocks]
        return state

    def restore_structure(self, state: dict) -> None:
        for rows in state.get("head_blocks", []):  # a CosineHead grows one block per task
            self.model.head.grow(rows)
        super().restore_structure(state)

    @property
    def new_classes(self) -> range:
        return range(self.known_classes, self.model.head.n_classes)

    @torch.no_grad()
    def collect_statistics(self, statistics: ClassStatistics, features_of) -> None:
        """Add this task's training features to ``statistics`` (eval mode: no adapter dropout)."""
        was_training = self.model.training
        self.model.eval()
        try:
            collect(statistics, features_of, self.statistics_loader(self.config.stats_transform),
                    self.device, self.new_classes)
        finally:
            self.model.train(was_training)

    def forward(self):
        if self.is_training:
            return super().forward()
        return self.predict(self.mb_x)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits over all seen classes at evaluation."""
        raise NotImplementedError


class ClassMeanPrototypes:
    """Prototypes = class means of ``self.features_for_prototypes`` kept in ``self.statistics``
    (float64 sums), with their checkpoint state: shared by SimpleCIL and APER."""

    def prototypes(self) -> torch.Tensor:
        return self.statistics.means()[: self.model.head.n_classes]

    def update_prototypes(self) -> None:
        self.collect_statistics(self.statistics, self.features_for_prototypes)
        self._cache_prototypes()

    def _cache_prototypes(self) -> None:
        self._prototypes = self.prototypes().to(self.device, torch.float32)

    def predict(self, images):
        return cosine_logits(self.features_for_prototypes(images), self._prototypes)

    def extra_state(self) -> dict:
        return {**super().extra_state(), "statistics": self.statistics.state_dict()}

    def restore_structure(self, state: dict) -> None:
        super().restore_structure(state)
        self.statistics.load_state_dict(state["statistics"])
        self._cache_prototypes()
