"""MOS (Sun et al., "MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental Learning",
AAAI 2025; official code sun-hailong/AAAI25-MOS, ``models/mos.py`` and ``backbone/vit_mos.py``).

Training: task t's adapter (going on from task t − 1's) and a linear head are trained with the
current task's cross-entropy plus an orthogonality term that pushes the batch's features away
from the old classes' means; after every optimiser step the adapter is merged towards the mean of
the earlier tasks' adapters (θ ← (1 − m)·θ + m·mean). After the task, class Gaussians from the
task's adapter realign the head (from the second task on), and class-mean prototypes of the
first task's adapter are kept for retrieval.

Inference (training-free self-refined retrieval): the first adapter's features and prototypes
give a first guess of the task; the head on that task's adapter features predicts a class whose
task names the next adapter to try, up to four times or until it stays put; the result is
ensembled with the first guess. One backbone pass per task adapter.

Recipe, sources and deviations: docs/methods/prototype.md
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from avalanche.core import SupervisedPlugin
from torch import nn
from torch.nn import functional as F

from clbench.alignment import align_classifier
from clbench.class_stats import ClassStatistics
from clbench.errors import UsageError
from clbench.methods.prototype.base import cosine_logits
from clbench.methods.prototype.task_adapters import (TaskAdapterConfig, TaskAdapterStrategy,
                                                      UnscaledGaussians)
from clbench.model import IncrementalHead
from clbench.precision import exact
from clbench.registry import register_method

# Official exps/mos_*.json (the IN-1k and IN-21k files of a dataset hold the same recipe).
_CIFAR = dict(epochs=20, lr=0.03, batch_size=48, weight_decay=5e-4, min_lr=0.0, ffn_num=16,
              reg=0.1, adapter_momentum=0.1, ensemble=True, ca_epochs=30, ca_lr=0.005,
              ca_samples=5 * 48, ca_weight_decay=5e-4, ca_covariance="full")
_IMAGENET_R = dict(_CIFAR, epochs=10, lr=0.05, batch_size=16, weight_decay=5e-3,
                   ca_samples=5 * 16, ca_weight_decay=5e-3)
BENCHMARK_DEFAULTS = {
    "cifar100": _CIFAR,
    "imagenet-r": _IMAGENET_R,
    "imagenet-a": dict(_IMAGENET_R, batch_size=32, ca_samples=5 * 32, ca_covariance="diagonal"),
    "cub200": dict(_CIFAR, epochs=10, lr=0.01, batch_size=32, ca_samples=5 * 32),
    "domainnet": _IMAGENET_R,  # no official file: the ImageNet-R recipe
    "digits": dict(_CIFAR, ffn_num=8),
}


@dataclass
class MOSConfig(TaskAdapterConfig):
    epochs: int = 20
    lr: float = 0.03
    reg: float = 0.1                # weight of the orthogonality term
    orth_temperature: float = 0.8   # similarities divided by it
    adapter_momentum: float = 0.1   # m of the merge after every step (0: no merging)
    head_lr_ratio: float = 0.1      # the head trains at lr × this
    refine_steps: int = 4           # MAX_ITER of the self-refined retrieval
    ensemble: bool = True           # add the first adapter's prototype prediction
    merge_in_forward: bool = False  # the code's in-place merge before every block (see docs)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.adapter_momentum <= 1.0:
            raise UsageError(f"adapter_momentum={self.adapter_momentum}: use a value in [0, 1]")
        if self.reg < 0 or self.orth_temperature <= 0 or self.head_lr_ratio <= 0:
            raise UsageError("mos needs reg >= 0, orth_temperature > 0 and head_lr_ratio > 0")
        if self.refine_steps < 1:
            raise UsageError(f"refine_steps={self.refine_steps}: at least one step")


class TruncNormalHead(IncrementalHead):
    """The codes' training head: the ViT's ``nn.Linear`` head, new rows trunc-normal (std 0.02,
    timm's init), zero bias."""

    def grow(self, n_new: int) -> None:
        old = self.n_classes
        super().grow(n_new)
        with torch.no_grad():
            nn.init.trunc_normal_(self.fc.weight[old:], std=0.02)


class _MergeAfterStep(SupervisedPlugin):
    def after_update(self, strategy, **kwargs):
        strategy.merge_adapter()


def retrieve(features: torch.Tensor, first_guess: torch.Tensor, head, task_of: torch.Tensor,
             steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-refined adapter retrieval. ``features[k, i]``: image i through task adapter k;
    ``first_guess``: logits naming each image's first adapter (by its predicted class's task).
    Each step classifies the image on its current adapter; the logits of the step where the
    predicted class's task equals the adapter, or of the last step, are returned with the
    adapter they came from."""
    n = features.shape[1]
    rows = torch.arange(n, device=features.device)
    adapter = task_of[first_guess.argmax(1)]
    final = first_guess.new_zeros(n, first_guess.shape[1])
    done = torch.zeros(n, dtype=torch.bool, device=features.device)
    for step in range(steps):
        logits = head(features[adapter, rows])
        predicted = task_of[logits.argmax(1)]
        stop = ~done & ((predicted == adapter) | (step == steps - 1))
        final[stop] = logits[stop]
        done |= stop
        if bool(done.all()):
            break
        adapter = torch.where(done, adapter, predicted)
    return final, adapter


@register_method("mos", "MOS: per-task adapters merged towards the earlier ones, classifier "
                        "alignment, self-refined adapter retrieval; one pass per task adapter")
class MOS(TaskAdapterStrategy):
    Config = MOSConfig

    def __init__(self, *, plugins=None, **kwargs):
        super().__init__(plugins=[*(plugins or []), _MergeAfterStep()], **kwargs)

    recipes = BENCHMARK_DEFAULTS
    fallback_recipe = _CIFAR

    @property
    def forward_passes_per_image(self) -> int:
        """Backbone passes at inference: one per task adapter (the first serves both the
        first guess and retrieval)."""
        return max(1, self.task + 1)

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        dim = model.head.in_features
        model.head = TruncNormalHead(dim)
        self.prototype_statistics = ClassStatistics(dim, second_moments=False)  # adapter 0
        self._prefix: list[list[torch.Tensor]] = []  # Σ_{k≤s} θ_k as each adapter was stored
        if self.config.merge_in_forward:
            for block in model.backbone.blocks:
                block.register_forward_pre_hook(self._merge_before_block)
        self._prototypes = self._task_of = None

    def make_gaussians(self, dim: int):
        return UnscaledGaussians(dim, self.config.cov_ridge)

    def trainable_parameters(self):
        if self.task < 0:
            return []
        return self.task_adapter_parameters(self.task) + list(self.model.head.parameters())

    def make_optimizer_for_task(self, params):
        cfg = self.config
        adapter = self.task_adapter_parameters(self.task)
        head = list(self.model.head.parameters())
        return torch.optim.SGD([{"params": adapter, "lr": cfg.lr},
                                {"params": head, "lr": cfg.lr * cfg.head_lr_ratio}],
                               lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)

    def merge_adapter(self) -> None:
        """After every optimiser step: the current adapter merged (the code's ``adapter_merge``)."""
        self.merge(self.task)

    @torch.no_grad()
    def merge(self, task: int) -> None:
        """θ_t ← (1 − m)·θ_t + m·Σ_{k<t} θ_k / t with the code's prefix sums, written into the
        tensors' data (the code assigns ``.data``; autograd does not see it)."""
        m = self.config.adapter_momentum
        if task < 1 or m == 0:
            return
        for p, total in zip(self.task_adapter_parameters(task), self._prefix[task - 1]):
            p.data.copy_((1 - m) * p.data + m * total / task)

    def _merge_before_block(self, block, args) -> None:
        """``merge_in_forward``: the code's ``forward_features`` re-merges the adapter it runs
        (every block's) before each block, in training and at inference."""
        active = self.adapters[0].active
        if self.config.merge_in_forward and active is not None and active >= 1:
            self.merge(active)

    def forward(self):
        if not self.is_training:
            return self.predict(self.mb_x)
        self._features = self.model.features(self.mb_x)  # the current adapter is active
        return self.model.head(self._features)

    def extra_loss(self):
        """reg · CE(M Mᵀ / τ, identity) over M = [old class means; the batch's features]."""
        cfg = self.config
        if cfg.reg == 0:
            return 0.0
        with exact(self.device):
            rows = self._features.float()
            if len(self.gaussians):
                rows = torch.cat([self.gaussians.means.to(self.device, torch.float32), rows])
            similarity = rows @ rows.T / cfg.orth_temperature
            target = torch.arange(len(rows), device=self.device)
            return cfg.reg * F.cross_entropy(similarity, target)

    def after_task(self, task: int) -> None:
        super().after_task(task)
        with torch.no_grad():  # the code's sum_adapter_param, when the adapter is stored
            stored = [p.detach().clone() for p in self.task_adapter_parameters(task)]
            if task > 0:
                stored = [p + total for p, total in zip(stored, self._prefix[-1])]
            self._prefix.append(stored)
        slots = [self.slot(task)] if task == 0 else [self.slot(task), self.slot(0)]
        features, labels = self.gather(slots)
        self.add_gaussians(features[0], labels, task)
        self.prototype_statistics.update(features[-1], labels)
        self.prototype_statistics.reduce(self.new_classes)
        if task > 0:
            with self.alignment_draws(task):
                align_classifier(self.model.head, self.gaussians, task, self.config, self.device)
        self.refresh()

    def refresh(self) -> None:
        n_classes = self.model.head.n_classes
        self._prototypes = self.prototype_statistics.means()[:n_classes].to(self.device,
                                                                            torch.float32)
        self._task_of = torch.tensor(self.gaussians.class_task, device=self.device)

    def predict(self, images):
        features = [self.adapter_features(images, self.slot(k)) for k in range(self.task + 1)]
        with exact(images.device):
            features = torch.stack([f.float() for f in features])
            first_guess = cosine_logits(features[0], self._prototypes)  # σ = 1, never trained
            logits, _ = retrieve(features, first_guess, self.model.head, self._task_of,
                              self.config.refine_steps)
            if self.config.ensemble:  # the first guess sharpened by the number of tasks
                sharpened = first_guess / (1 / (self.task + 1))
                logits = F.softmax(logits, dim=1) + F.softmax(sharpened, dim=1)
        return logits

    def stored(self) -> dict:
        stored = super().stored()
        stored["stored_statistics"] += self.prototype_statistics.sum.numel()
        return stored

    def extra_state(self) -> dict:
        return {**super().extra_state(),
                "prototype_statistics": self.prototype_statistics.state_dict(),
                "prefix_sums": [[t.cpu() for t in total] for total in self._prefix]}

    def restore_structure(self, state: dict) -> None:
        super().restore_structure(state)
        self.prototype_statistics.load_state_dict(state["prototype_statistics"])
        self._prefix = [[t.to(self.device) for t in total] for total in state["prefix_sums"]]
        self.refresh()
