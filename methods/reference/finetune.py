"""Reference points: sequential full fine-tuning (lower bound) and a linear probe.

Recipe, sources and deviations: docs/methods/reference.md
"""
from __future__ import annotations

from dataclasses import dataclass

from clbench.hparams import TrainConfig
from clbench.registry import register_method
from clbench.strategy import CLStrategy


@dataclass
class FinetuneConfig(TrainConfig):
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 32


@register_method("finetune", "sequential full fine-tuning of backbone + head (the papers' "
                             "'Full Fine-Tuning' lower bound)")
class Finetune(CLStrategy):
    """Every backbone weight and the head train on each task in turn; no protection against
    forgetting. SGD momentum 0.9 on the current-task-masked cross-entropy like the other methods."""

    Config = FinetuneConfig

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        if benchmark == "digits":
            return {}
        # Full fine-tuning of ViT-B/16 with SD-LoRA's lr diverges; LAMDA-PILOT's finetune uses 0.005 (cosine).
        return {"epochs": 20, "lr": 0.005, "batch_size": 128}

    def prepare_model(self, model) -> None:
        model.backbone.requires_grad_(True)


@dataclass
class LinearProbeConfig(TrainConfig):
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 32


@register_method("linear-probe", "frozen pretrained backbone, only the growing linear head trains")
class LinearProbe(CLStrategy):
    """Frozen backbone features + the shared class-incremental head (current-task loss)."""

    Config = LinearProbeConfig

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        return {} if benchmark == "digits" else {"epochs": 20, "lr": 0.01, "batch_size": 128}
