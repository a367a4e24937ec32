"""APER (a.k.a. ADAM; Zhou et al., IJCV 2024; official code zhoudw-zdw/RevisitingCIL
``models/aper_adapter.py``, ``models/aper_ssf.py``; LAMDA-PILOT ``models/aper_adapter.py``).

First task only: parallel adapters (``parallel_adapter``), or SSF (``peft="ssf"``, ``ssf``), are
tuned together with a cosine head (``first_session``). Afterwards nothing trains: the feature of
an image is the concatenation [pretrained backbone(x), adapted backbone(x)] (two forward passes),
and prediction is the cosine to the class means of that feature (SimpleCIL on it).

Recipe, sources and deviations: docs/methods/prototype.md
"""
from __future__ import annotations

import torch

from clbench.class_stats import ClassStatistics
from clbench.methods.prototype.base import ClassMeanPrototypes
from clbench.methods.prototype.first_session import CIFAR_RECIPE, BENCHMARK_DEFAULTS, FirstSessionTuning
from clbench.registry import register_method


@register_method("aper", "APER/ADAM (adapter): adapters tuned on the first task, then cosine to "
                         "prototypes of [pretrained, adapted] features, 2 forward passes")
class APER(ClassMeanPrototypes, FirstSessionTuning):
    forward_passes_per_image = 2
    variant_keys = ("peft",)  # SSF has its own per-benchmark settings

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int, peft: str = "adapter") -> dict:
        if peft == "ssf":
            bottleneck = BENCHMARK_DEFAULTS.get(benchmark, CIFAR_RECIPE)["ffn_num"]
            return dict(CIFAR_RECIPE, peft="ssf", ffn_num=bottleneck)
        return dict(BENCHMARK_DEFAULTS.get(benchmark, CIFAR_RECIPE))

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        self.statistics = ClassStatistics(2 * model.head.in_features, second_moments=False)

    def features(self, images):
        """[pretrained(x), adapted(x)]: the official MultiBranchCosineIncrementalNet order."""
        return torch.cat([self.pretrained_features(images), self.adapted_features(images)], dim=1)

    features_for_prototypes = features

    def learn_without_gradients(self, task: int) -> None:
        self.update_prototypes()

    def task_info(self) -> dict:
        return {"first_session_tuned": self.task == 0}
