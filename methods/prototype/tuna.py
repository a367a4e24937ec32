"""TUNA (Wang, Zhou & Ye, "Integrating Task-Specific and Universal Adapters for Pre-Trained
Model-based Class-Incremental Learning", ICCV 2025, arXiv 2508.08165; official code
LAMDA-CL/ICCV2025-TUNA, ``models/tuna.py`` and ``backbone/vit_tuna.py``; port: LAMDA-CL C3Box
``models/tuna.py``).

Training: task t's adapter (going on from task t − 1's) and a cosine head are trained with a
CosFace loss on the current task's classes plus a term that keeps the adapter's up-projections
orthogonal to the earlier adapters'. After the task a universal adapter is merged from all task
adapters (EMR-merging's sign election and maximum magnitude) and class Gaussians realign the
head (from the second task on).

Inference: every task adapter classifies the image; the prediction with the lowest entropy is
added, as probabilities, to the universal adapter's. One backbone pass per task adapter plus
one for the universal adapter (one pass in all after the first task).

Recipe, sources and deviations: docs/methods/prototype.md
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from clbench.alignment import ClassGaussians, align_classifier
from clbench.errors import UsageError
from clbench.methods.prototype.base import CosineHead
from clbench.methods.prototype.task_adapters import TaskAdapterConfig, TaskAdapterStrategy
from clbench.precision import exact
from clbench.registry import register_method

# Official exps/tuna_{cifar,imgr,imga,obj}.json (the ViT-B/16 IN-21k backbone).
_IMAGENET_R = dict(epochs=10, lr=0.02, batch_size=32, weight_decay=5e-4, min_lr=0.0, ffn_num=16,
                   scale=20.0, margin=0.0, reg=0.001, use_orth=True, decay=True, ca_epochs=30,
                   ca_lr=0.005, ca_samples=5 * 32, ca_weight_decay=5e-4, ca_t_max=5)
_CIFAR = dict(_IMAGENET_R, epochs=15, lr=0.01, batch_size=16, use_orth=False, decay=False,
              ca_samples=5 * 16)
BENCHMARK_DEFAULTS = {
    "cifar100": _CIFAR,
    "imagenet-r": _IMAGENET_R,
    "imagenet-a": dict(_IMAGENET_R, epochs=20, lr=0.01, batch_size=16, margin=0.3, ca_epochs=10,
                       ca_lr=0.01, ca_samples=5 * 16),
    "cub200": _IMAGENET_R,     # no official file: the ImageNet-R recipe
    "domainnet": _IMAGENET_R,  # no official file: the ImageNet-R recipe
    "digits": dict(_IMAGENET_R, ffn_num=8),
}
UNIVERSAL = ("merged", "last")
DECAY = ("task", "official")


@dataclass
class TUNAConfig(TaskAdapterConfig):
    epochs: int = 10
    lr: float = 0.02
    batch_size: int = 32
    ca_samples: int = 160
    scale: float = 20.0            # s of the CosFace loss and of every logit at alignment/test
    margin: float = 0.0            # m of the CosFace loss
    reg: float = 0.001             # weight of the orthogonality term (times e^-(t+1))
    use_orth: bool = True
    decay: bool = True             # shrink older classes' means when sampling (SLCA)
    decay_rule: str = "task"       # "official": the code's negative task size (see the docs)
    ca_t_max: int = 5              # T_max of the alignment's CosineAnnealingLR (fixed in the code)
    universal: str = "merged"      # "last": the code's evaluated path, the last task's adapter
    orth_moves_old: bool = False   # True: the code's gradient into earlier up-projections

    def __post_init__(self):
        super().__post_init__()
        if self.universal not in UNIVERSAL:
            raise UsageError(f"universal={self.universal!r}: choose 'merged' (the universal "
                             "adapter) or 'last' (the official code's evaluated path)")
        if self.decay_rule not in DECAY:
            raise UsageError(f"decay_rule={self.decay_rule!r}: choose 'task' or 'official'")
        if self.scale <= 0 or self.reg < 0 or self.ca_t_max < 1:
            raise UsageError("tuna needs scale > 0, reg >= 0 and ca_t_max >= 1")


class TUNAGaussians(ClassGaussians):
    """Means shrunk as in SLCA (``decay``), not at all, or by the code's rule, which divides the
    class index by minus the task size."""

    def __init__(self, dim: int, ridge: float, decay: bool, rule: str):
        super().__init__(dim, ridge)
        self.decay, self.rule = decay, rule

    def mean_scale(self, c: int, task: int) -> float:
        if not self.decay:
            return 1.0
        if self.rule == "task":
            return super().mean_scale(c, task)
        task_of_c = c // -self.class_task.count(task)  # task_size = known − total < 0
        return 0.9 + (task_of_c + 1) / (task + 1) * 0.1


class UnitCosineHead(CosineHead):
    """The code's ``SimpleContinualLinear``: cosine logits with scale 1 (σ fixed), one block of
    trunc-normal rows (std 0.02) per task, every block trainable."""

    def __init__(self, in_features: int):
        super().__init__(in_features)
        self.sigma.requires_grad_(False)

    def grow(self, n_new: int) -> None:
        super().grow(n_new)
        with torch.no_grad():
            nn.init.trunc_normal_(self.blocks[-1], std=0.02)


class Scaled(nn.Module):
    def __init__(self, head: nn.Module, scale: float):
        super().__init__()
        self.head, self.scale = head, scale

    def forward(self, x):
        return self.scale * self.head(x)


def emr_unified(tensors: list[torch.Tensor]) -> torch.Tensor:
    """EMR-merging's unified vector: per entry, the sign of the mean (+1 only if > 0) and the
    largest magnitude among the tensors that agree with it (0 if none)."""
    stacked = torch.stack(tensors)
    sign = torch.where(stacked.mean(0) > 0, 1.0, -1.0).to(stacked.dtype)
    agreeing = torch.where(stacked * sign > 0, stacked.abs(), torch.zeros_like(stacked))
    return agreeing.amax(0) * sign


def orthogonality(current: list[torch.Tensor], earlier: list[list[torch.Tensor]]) -> torch.Tensor:
    """Σ over earlier adapters of the block-mean of |mean(Û_cur Û_oldᵀ)|, Û = up-projection
    weights with unit rows."""
    total = 0.0
    for old in earlier:
        for cur, prev in zip(current, old):
            dot = F.normalize(cur, dim=1) @ F.normalize(prev, dim=1).T
            total = total + dot.mean().abs() / len(current)
    return total


def entropy_selected(logits: torch.Tensor) -> torch.Tensor:
    """``logits[k, i]``: image i through task adapter k; each image's lowest-entropy row (first
    on ties)."""
    probs = F.softmax(logits, dim=2)
    entropy = -(probs * torch.log(probs + 1e-10)).sum(2)
    pick = entropy.argmin(0)
    return logits[pick, torch.arange(logits.shape[1], device=logits.device)]


@register_method("tuna", "TUNA: orthogonal task adapters chosen by entropy plus a universal "
                         "adapter merged from them, classifier alignment; tasks + 1 passes")
class TUNA(TaskAdapterStrategy):
    Config = TUNAConfig
    first_slot = 1  # slot 0: the universal adapter

    recipes = BENCHMARK_DEFAULTS
    fallback_recipe = _IMAGENET_R

    @property
    def forward_passes_per_image(self) -> int:
        """Backbone passes at inference: the first task's adapter alone after task 1, then one
        per task adapter and one for the universal adapter (none with ``universal="last"``)."""
        if self.task < 1:
            return 1
        return self.task + 1 + int(self.config.universal == "merged")

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        model.head = UnitCosineHead(model.head.in_features)
        self.add_slot()  # the universal adapter, filled from the second task on

    def make_gaussians(self, dim: int):
        return TUNAGaussians(dim, self.config.cov_ridge, self.config.decay, self.config.decay_rule)

    def up_projections(self, task: int) -> list[nn.Parameter]:
        return [wrapper.adapters[self.slot(task)].up.weight for wrapper in self.adapters]

    def before_task(self, task: int) -> None:
        super().before_task(task)
        if self.config.orth_moves_old and self.config.use_orth:
            for k in range(task):
                for p in self.up_projections(k):
                    p.requires_grad_(True)

    def trainable_parameters(self):
        if self.task < 0:
            return []
        params = self.task_adapter_parameters(self.task)
        if self.config.orth_moves_old and self.config.use_orth:
            params = params + [p for k in range(self.task) for p in self.up_projections(k)]
        return params + list(self.model.head.blocks)

    def criterion(self):
        """CosFace on the current task's classes: CE(s·(cos − m·onehot)), plus the term."""
        if not self.is_training:
            return super().criterion()
        cfg = self.config
        cosine = self.mb_output[:, self.known_classes:].float()
        target = self.mb_y - self.known_classes
        logits = cfg.scale * (cosine - cfg.margin * F.one_hot(target, cosine.shape[1]))
        return F.cross_entropy(logits, target) + self.extra_loss()

    def extra_loss(self):
        cfg = self.config
        if self.task < 1 or not cfg.use_orth:
            return 0.0
        with exact(self.device):
            earlier = [self.up_projections(k) for k in range(self.task)]
            term = orthogonality(self.up_projections(self.task), earlier)
            weight = torch.exp(-torch.tensor(self.task + 1, dtype=torch.float32,
                                             device=self.device))
            return term * cfg.reg * weight

    def after_task(self, task: int) -> None:
        super().after_task(task)
        for k in range(task):
            for p in self.up_projections(k):
                p.requires_grad_(False)
        features, labels = self.gather([self.slot(task)])
        self.add_gaussians(features[0], labels, task)
        if task > 0:
            self.merge_universal(task)
            with self.alignment_draws(task):
                align_classifier(Scaled(self.model.head, self.config.scale), self.gaussians,
                                 task, self.config, self.device, t_max=self.config.ca_t_max)

    @torch.no_grad()
    def merge_universal(self, task: int) -> None:
        """Slot 0 ← the EMR-merged task adapters 0..task, tensor by tensor."""
        for wrapper in self.adapters:
            tasks = [dict(wrapper.adapters[self.slot(k)].named_parameters())
                     for k in range(task + 1)]
            for name, p in wrapper.adapters[0].named_parameters():
                p.copy_(emr_unified([t[name] for t in tasks]))

    def predict(self, images):
        scale = self.config.scale
        features = [self.adapter_features(images, self.slot(k)) for k in range(self.task + 1)]
        if self.task == 0:
            with exact(images.device):
                return scale * self.model.head(features[0].float())
        universal = features[-1] if self.config.universal == "last" else \
            self.adapter_features(images, 0)
        with exact(images.device):
            logits = torch.stack([scale * self.model.head(f.float()) for f in features])
            selected = entropy_selected(logits)
            general = scale * self.model.head(universal.float())
            return F.softmax(general, dim=1) + F.softmax(selected, dim=1)
