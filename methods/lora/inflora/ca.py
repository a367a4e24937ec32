"""InfLoRA+CA: InfLoRA followed, after every task t ≥ 1, by SLCA-style classifier alignment
(official code liangyanshuo/InfLoRA, ``methods/inflora_ca.py`` and ``methods/inflora_ca1.py``):
the whole head is retrained on features sampled from Gaussians of every seen class (mean and
covariance of its training images' features under the test transform). Runs inside
``strategy.train()``, so it is timed.

Recipe, sources and deviations: docs/methods/lora.md
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clbench.alignment import (AlignmentOptions, ClassGaussians, GaussianStatistics,
                               align_classifier)
from clbench.class_stats import StatisticsOptions
from clbench.methods.lora.inflora.strategy import BENCHMARK_DEFAULTS, InfLoRA, InfLoRAConfig
from clbench.registry import register_method

# Official configs/mimg10_infloraca.json (InfLoRA_CA) and configs/cifar100_infloraca.json (_CA1).
_CA_IMAGENET_R = dict(epochs=50, lr=1e-3, batch_size=128, rank=10, lambda_b=0.95,
                      optimizer="sgd", schedule="annealing", memory="gpm")
CA_DEFAULTS = {
    "imagenet-r": _CA_IMAGENET_R,
    "imagenet-a": _CA_IMAGENET_R,
    "cub200": _CA_IMAGENET_R,
    "domainnet": _CA_IMAGENET_R,
    "cifar100": dict(epochs=20, lr=1e-3, head_lr=1e-2, weight_decay=1e-3, batch_size=128, rank=5,
                     lambda_b=0.95, optimizer="sgd", schedule="step", step_epoch=18,
                     memory="gpm"),
    "digits": BENCHMARK_DEFAULTS["digits"],
}


@dataclass
class InfLoRACAConfig(AlignmentOptions, StatisticsOptions, InfLoRAConfig):
    lr_scaled_fields: ClassVar[tuple[str, ...]] = ("head_lr", "ca_lr")


@register_method("inflora-ca", "InfLoRA + classifier alignment (per-class Gaussian feature "
                               "replay retrains the head after each task), 1 forward pass")
class InfLoRACA(GaussianStatistics, InfLoRA):
    Config = InfLoRACAConfig

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        return dict(CA_DEFAULTS.get(benchmark, {}))

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        self.gaussians = ClassGaussians(model.head.in_features, self.config.cov_ridge)

    def after_task(self, task: int) -> None:
        super().after_task(task)
        self.add_class_statistics(task)
        if task > 0:
            align_classifier(self.model.head, self.gaussians, task, self.config, self.device)

    def task_info(self) -> dict:
        return {**super().task_info(), "aligned_classes": self.model.head.n_classes
                if self.task > 0 else 0}

    def extra_state(self) -> dict:
        return {**super().extra_state(), **self.gaussians.state_dict()}

    def restore_structure(self, state: dict) -> None:
        super().restore_structure(state)
        self.gaussians.load_state_dict(state)
