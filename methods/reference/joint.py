"""`joint`: the cumulative joint-training upper bound.

At task t the model trains on the union of the training data of tasks 0..t with the loss over all
seen classes (no current-task masking), so nothing is forgotten by construction. The union is
rebuilt from the stream itself (Avalanche's ``origin_stream``), so a resumed run trains on the
same data. Never ranked against the continual methods.

Recipe, sources and deviations: docs/methods/reference.md
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

from torch.nn import functional as F

from clbench.hparams import TrainConfig
from clbench.registry import register_method
from clbench.strategy import CLStrategy


@dataclass
class JointConfig(TrainConfig):
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 32
    train_backbone: bool = True


@register_method("joint", "upper bound: at each task, train on all tasks' data seen so far with "
                          "the loss over all seen classes")
class Joint(CLStrategy):
    Config = JointConfig
    reference = "upper-bound"  # shown in reports, never ranked against continual methods

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        return {} if benchmark == "digits" else {"epochs": 20, "lr": 0.005, "batch_size": 128}

    def prepare_model(self, model) -> None:
        model.backbone.requires_grad_(self.config.train_backbone)

    def train_dataset_adaptation(self, **kwargs):
        seen = self.experience.origin_stream[: self.experience.current_experience + 1]
        self.adapted_dataset = reduce(lambda a, b: a.concat(b), (e.dataset for e in seen)).train()

    def criterion(self):
        if not self.is_training:
            return super().criterion()
        return F.cross_entropy(self.mb_output, self.mb_y)
