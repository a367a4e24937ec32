"""EASE (Zhou et al., "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental
Learning", CVPR 2024; official code sun-hailong/CVPR24-Ease ``models/ease.py``; also LAMDA-PILOT
``models/ease.py``).

Task t adds one new set of parallel adapters, trained on task t only with a fresh cosine head;
adapter s defines subspace s. New classes get real prototypes in every subspace; old classes'
missing prototypes in later subspaces are completed from semantic similarity
(``solve_sim_reset``), and a test image's logits are reweighted cosines summed over all subspaces
(one backbone pass per subspace).

Recipe, sources and deviations: docs/methods/prototype.md
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from clbench.methods.prototype import parallel_adapter
from clbench.class_stats import ClassStatistics
from clbench.errors import UsageError
from clbench.methods.prototype.first_session import AdapterConfig
from clbench.methods.prototype.base import CosineHead, PrototypeStrategy
from clbench.precision import exact
from clbench.registry import register_method

_CIFAR = dict(epochs=20, lr=0.025, batch_size=48, weight_decay=5e-4, min_lr=0.0, ffn_num=64,
              alpha=0.1, beta=0.0, use_init_ptm=False)
_IMAGENET_R = dict(_CIFAR, lr=0.05, batch_size=16, weight_decay=5e-3)
BENCHMARK_DEFAULTS = {
    "cifar100": _CIFAR,
    "imagenet-r": _IMAGENET_R,
    "imagenet-a": dict(_IMAGENET_R, batch_size=32),
    "cub200": dict(_CIFAR, lr=0.005, batch_size=16, alpha=0.005, beta=1.0, use_init_ptm=True),
    "domainnet": _IMAGENET_R,
    "digits": dict(_CIFAR, ffn_num=8),
}


@dataclass
class EASEConfig(AdapterConfig):
    epochs: int = 20
    lr: float = 0.025
    alpha: float = 0.1          # weight of a class's logits in other tasks' subspaces (÷ t)
    beta: float = 0.0           # weight of the pretrained subspace (use_init_ptm)
    use_init_ptm: bool = False  # add the adapter-free backbone as one more subspace

    def __post_init__(self):
        super().__post_init__()
        if self.alpha < 0 or self.beta < 0:
            raise UsageError(f"alpha={self.alpha}, beta={self.beta}: subspace weights must be ≥ 0")


def complement(real: torch.Tensor, ranges: list[tuple[int, int]], offset: int = 0) -> torch.Tensor:
    """Fill the prototypes of old classes in later subspaces (EASE's ``solve_sim_reset``).

    ``real[c, offset + s]`` holds the class mean of class c in adapter subspace s for every class
    of a task ≥ s; the other entries are overwritten here."""
    protos = real.clone()
    n_classes = ranges[-1][1]
    for i, (start, stop) in enumerate(ranges[:-1]):
        for s in range(i + 1, len(ranges)):
            later = slice(ranges[s][0], n_classes)
            a = protos[later, offset + i]
            b = protos[later, offset + s]
            a_hat = protos[start:stop, offset + i]
            similarity = F.softmax(F.normalize(a_hat, dim=1) @ F.normalize(a, dim=1).T, dim=1)
            protos[start:stop, offset + s] = similarity @ b
    return protos


@register_method("ease", "EASE: one adapter subspace per task, semantic-guided prototype "
                         "complement, reweighted cosine over concatenated features, T passes")
class EASE(PrototypeStrategy):
    Config = EASEConfig

    recipes = BENCHMARK_DEFAULTS
    fallback_recipe = _CIFAR

    @property
    def forward_passes_per_image(self) -> int:
        """Backbone passes at inference: one per adapter subspace (+ the pretrained one)."""
        return max(1, len(self.subspace_statistics) + int(self.config.use_init_ptm))

    def prepare_model(self, model) -> None:
        model.backbone.requires_grad_(False)
        model.head = CosineHead(model.head.in_features)
        self.adapters = parallel_adapter.install(model.backbone)
        dim = model.head.in_features
        self.subspace_statistics: list[ClassStatistics] = []  # s: adapter s, classes of tasks ≥ s
        self.pretrained_statistics = ClassStatistics(dim, second_moments=False)
        self.task_ranges: list[tuple[int, int]] = []
        self._prototypes: torch.Tensor | None = None  # device copies for predict()
        self._weights: torch.Tensor | None = None

    def epochs_for_task(self, task: int) -> int:
        return self.config.epochs

    def new_subspace(self) -> None:
        cfg = self.config
        for index in range(len(self.adapters[0].adapters)):
            for p in parallel_adapter.adapter_parameters(self.adapters, index):
                p.requires_grad_(False)
        parallel_adapter.add_adapters(self.adapters, cfg.ffn_num, cfg.adapter_scale,
                                      cfg.adapter_dropout)
        dim = self.model.head.in_features
        self.subspace_statistics.append(ClassStatistics(dim, second_moments=False))

    def before_task(self, task: int) -> None:
        self.new_subspace()
        self.task_ranges.append((self.known_classes, self.model.head.n_classes))
        self.model.head.start_task()

    def trainable_parameters(self):
        if self.task < 0:
            return []
        head = self.model.head
        current = parallel_adapter.adapter_parameters(self.adapters, self.task)
        return current + [head.blocks[-1], head.sigma]

    def subspace_features(self, images, index: int | None):
        with parallel_adapter.using(self.adapters, index):
            return self.model.features(images)

    def after_task(self, task: int) -> None:
        for p in parallel_adapter.adapter_parameters(self.adapters, task):
            p.requires_grad_(False)
        for s, statistics in enumerate(self.subspace_statistics):
            self.collect_statistics(statistics, lambda x, s=s: self.subspace_features(x, s))
        if self.config.use_init_ptm:
            self.collect_statistics(self.pretrained_statistics,
                                    lambda x: self.subspace_features(x, None))
        self.refresh_classifier()

    def refresh_classifier(self) -> None:
        """Device copies of the prototypes (complement included) and of the subspace weights."""
        self._prototypes = self.prototypes().to(self.device, torch.float32)
        self._weights = self.subspace_weights().to(self.device)

    def real_prototypes(self) -> torch.Tensor:
        """(classes, subspaces, d) class means; entries of old classes in later subspaces are 0."""
        n_classes, dim = self.task_ranges[-1][1], self.model.head.in_features
        offset = int(self.config.use_init_ptm)
        subspaces = offset + len(self.subspace_statistics)
        real = torch.zeros(n_classes, subspaces, dim, dtype=torch.float64)
        if offset:
            real[:, 0] = self.pretrained_statistics.means()[:n_classes]
        for s, statistics in enumerate(self.subspace_statistics):
            start = self.task_ranges[s][0]
            real[start:, offset + s] = statistics.means()[start:n_classes]
        return real

    def prototypes(self) -> torch.Tensor:
        return complement(self.real_prototypes(), self.task_ranges, int(self.config.use_init_ptm))

    def subspace_weights(self) -> torch.Tensor:
        """(classes, subspaces): 1 in the class's own subspace, α/t elsewhere, β for the PTM."""
        cfg, t = self.config, len(self.task_ranges) - 1
        offset = int(cfg.use_init_ptm)
        weights = torch.full((self.task_ranges[-1][1], offset + t + 1), cfg.alpha / max(t, 1))
        if offset:
            weights[:, 0] = cfg.beta
        for i, (start, stop) in enumerate(self.task_ranges):
            weights[start:stop, offset + i] = 1.0
        return weights

    def predict(self, images):
        protos, weights = self._prototypes, self._weights
        indices = list(range(len(self.subspace_statistics)))
        if self.config.use_init_ptm:
            indices = [None] + indices  # the pretrained subspace comes first
        logits = 0.0
        for j, index in enumerate(indices):
            features = self.subspace_features(images, index)
            with exact(images.device):
                cosine = F.normalize(features.float(), dim=1) @ F.normalize(protos[:, j], dim=1).T
                logits = logits + cosine * weights[:, j]
        return logits

    def task_info(self) -> dict:
        return {"subspaces": len(self.subspace_statistics),
                "forward_passes": self.forward_passes_per_image}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "task_ranges": [list(r) for r in self.task_ranges],
                "subspace_statistics": [s.state_dict() for s in self.subspace_statistics],
                "pretrained_statistics": self.pretrained_statistics.state_dict()}

    def restore_structure(self, state: dict) -> None:
        super().restore_structure(state)
        self.task_ranges = [tuple(r) for r in state["task_ranges"]]
        for saved in state["subspace_statistics"]:
            self.new_subspace()
            self.subspace_statistics[-1].load_state_dict(saved)
        for p in parallel_adapter.adapter_parameters(self.adapters, len(self.task_ranges) - 1):
            p.requires_grad_(False)
        self.pretrained_statistics.load_state_dict(state["pretrained_statistics"])
        self.refresh_classifier()
