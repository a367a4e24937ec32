"""SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", IJCV 2024; official code
zhoudw-zdw/RevisitingCIL ``models/simplecil.py``, also LAMDA-PILOT ``models/simplecil.py``).

No training at all: after each task, the prototype of every new class is the mean of the frozen
pretrained backbone's features over the class's training images (under the test transform); a
test image goes to the class whose prototype has the highest cosine similarity.

Recipe, sources and deviations: docs/methods/prototype.md
"""
from __future__ import annotations

from dataclasses import dataclass

from clbench.class_stats import ClassStatistics
from clbench.methods.prototype.base import ClassMeanPrototypes, PrototypeConfig, PrototypeStrategy
from clbench.registry import register_method


@dataclass
class SimpleCILConfig(PrototypeConfig):
    """Nothing trains: ``epochs`` is unused (kept 0 so the resolved config says so)."""

    epochs: int = 0


@register_method("simplecil", "SimpleCIL: cosine to class-mean prototypes of the frozen "
                              "pretrained features, no training, 1 forward pass")
class SimpleCIL(ClassMeanPrototypes, PrototypeStrategy):
    Config = SimpleCILConfig
    forward_passes_per_image = 1

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        # Official exps/simplecil/*.json: batch 48 for the prototype pass; nothing trains.
        return {"epochs": 0}

    def prepare_model(self, model) -> None:
        model.backbone.requires_grad_(False)
        self.statistics = ClassStatistics(model.head.in_features, second_moments=False)

    def features_for_prototypes(self, images):
        return self.model.features(images)

    def after_task(self, task: int) -> None:
        self.update_prototypes()

    def task_info(self) -> dict:
        return {"prototypes": int(self.statistics.n_classes)}
