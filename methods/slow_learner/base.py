"""What SLCA and SLCA++ share (official code GengDavid/SLCA, ``models/slca.py``): the slow learner
and the classifier alignment around it.

* **Slow learner:** SGD (momentum 0.9) with one parameter group per part: the backbone at
  ``lr × backbone_lr_scale`` and the head at ``lr``, all with ``weight_decay``; the loss is the
  cross-entropy of the current task's logits (old heads are frozen). New head rows start as the
  official per-task ``nn.Linear`` (trunc-normal std 0.02, zero bias).
* **Classifier alignment (CA):** after every task the class Gaussians of the new classes (features
  of the task's training images under the test transform) are added; from task 2 on the whole head
  is retrained on samples of every seen class (``clbench.alignment``). The aligned head is what
  evaluation sees; the next task trains from the head as it was before alignment (the official
  ``fc.backup()`` / ``fc.recall()``), so alignment never accumulates across tasks.
* ``reset_final_norm``: the official ViT replaces the pretrained final LayerNorm by a fresh one
  (weight 1, bias 0) before training.

Recipe, sources and deviations: docs/methods/slow_learner.md
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from clbench.alignment import (AlignmentOptions, ClassGaussians, GaussianStatistics,
                               align_classifier)
from clbench.class_stats import StatisticsOptions
from clbench.errors import UsageError
from clbench.hparams import TrainConfig
from clbench.strategy import CLStrategy


@dataclass
class SlowLearnerConfig(AlignmentOptions, StatisticsOptions, TrainConfig):
    lr_scaled_fields: ClassVar[tuple[str, ...]] = ("ca_lr",)
    # Official defaults (models/slca.py globals and exps/slca/slca_imgnetr.json).
    epochs: int = 50
    lr: float = 0.01                  # the head's rate (official ``lrate``)
    batch_size: int = 128
    backbone_lr_scale: float = 0.01   # official ``bcb_lrscale``: backbone at lr × this
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [40])
    lr_decay: float = 0.1
    reset_final_norm: bool = True     # official: the final LayerNorm starts as weight 1, bias 0
    recall_head: bool = True          # official: train each task from the head before alignment

    def __post_init__(self):
        super().__post_init__()
        if self.backbone_lr_scale <= 0 or self.weight_decay < 0 or not 0 < self.lr_decay <= 1:
            raise UsageError("slow learner: backbone_lr_scale must be > 0 (0 would be a linear "
                             "probe), weight_decay >= 0 and 0 < lr_decay <= 1")
        if any(m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise UsageError(f"slow learner: milestones must be increasing epochs >= 1, got "
                             f"{self.milestones}")


class SlowLearner(GaussianStatistics, CLStrategy):
    """Base of SLCA and SLCA++; subclasses choose what of the backbone trains
    (``select_backbone``) and its parameter groups (``backbone_groups``)."""

    Config = SlowLearnerConfig
    forward_passes_per_image = 1

    # ----------------------------------------------------------------- model
    def prepare_model(self, model) -> None:
        self.select_backbone(model.backbone)
        norm = getattr(model.backbone, "norm", None)
        if self.config.reset_final_norm and isinstance(norm, nn.LayerNorm):
            with torch.no_grad():
                norm.weight.fill_(1.0)
                norm.bias.zero_()
        self.gaussians = self.make_gaussians(model.head.in_features)
        self.head_before_alignment: dict | None = None

    def select_backbone(self, backbone: nn.Module) -> None:
        """SLCA: every backbone weight trains."""
        backbone.requires_grad_(True)

    def make_gaussians(self, dim: int) -> ClassGaussians:
        return ClassGaussians(dim, self.config.cov_ridge)

    # ----------------------------------------------------------------- task boundaries
    @torch.no_grad()
    def before_task(self, task: int) -> None:
        fc, known = self.model.head.fc, self.known_classes
        if self.config.recall_head and self.head_before_alignment is not None:
            fc.weight[:known] = self.head_before_alignment["weight"].to(fc.weight)
            fc.bias[:known] = self.head_before_alignment["bias"].to(fc.bias)
        rows = torch.empty_like(fc.weight[known:])
        nn.init.trunc_normal_(rows, std=0.02)
        fc.weight[known:] = rows
        fc.bias[known:] = 0.0

    def after_task(self, task: int) -> None:
        self.add_class_statistics(task)
        fc = self.model.head.fc
        self.head_before_alignment = {"weight": fc.weight.detach().cpu().clone(),
                                      "bias": fc.bias.detach().cpu().clone()}
        if task > 0 and self.config.ca_epochs > 0:
            align_classifier(self.model.head, self.gaussians, task, self.config, self.device)

    # ----------------------------------------------------------------- optimisation
    def backbone_groups(self) -> list[dict]:
        """SLCA: one group, the whole backbone at lr × backbone_lr_scale."""
        params = [p for p in self.model.backbone.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.config.lr * self.config.backbone_lr_scale}]

    def make_optimizer_for_task(self, params):
        """The backbone groups then the head, SGD momentum 0.9. Weight decay reaches only the
        current task's head rows (official: old heads are frozen), so for the head it is the
        equivalent L2 term in ``extra_loss`` rather than the optimiser's decay of the whole
        shared matrix."""
        c = self.config
        groups = [{**g, "weight_decay": c.weight_decay} for g in self.backbone_groups()]
        groups.append({"params": list(self.model.head.parameters()), "lr": c.lr,
                       "weight_decay": 0.0})
        return torch.optim.SGD(groups, lr=c.lr, momentum=0.9)

    def make_scheduler_for_task(self, optimizer):
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(self.config.milestones),
                                                    gamma=self.config.lr_decay)

    def extra_loss(self):
        if not self.config.weight_decay:
            return 0.0
        return 0.5 * self.config.weight_decay * self.model.head.squared_norm_from(
            self.known_classes)

    # ----------------------------------------------------------------- bookkeeping
    def task_info(self) -> dict:
        return {"aligned_classes": self.model.head.n_classes
                if self.task > 0 and self.config.ca_epochs > 0 else 0}

    def extra_state(self) -> dict:
        state = {**super().extra_state(), **self.gaussians.state_dict()}
        if self.head_before_alignment is not None:
            state["head_before_alignment"] = self.head_before_alignment
        return state

    def restore_structure(self, state: dict) -> None:
        super().restore_structure(state)
        self.gaussians.load_state_dict(state)
        self.head_before_alignment = state.get("head_before_alignment")
