"""CL-LoRA (He, Duan & Zhu, "CL-LoRA: Continual Low-Rank Adaptation for Rehearsal-Free
Class-Incremental Learning", CVPR 2025; official code JiangpengHe/CL-LoRA, ``models/cllora.py``
and ``backbone/vit_cllora.py``, recipes ``exps/*.json``).

Dual adapters on q and v: task-shared LoRA in the first blocks (fixed random orthogonal
down-projections, up-projections trained on every task, distilled from the previous task's
and with their distillation gradient reweighted row-wise by the previous up-projection's row
norms) and task-specific LoRA in the remaining blocks (one set per task with learnable
block-wise weights kept apart by an orthogonality term). Each batch of a task t ≥ 1 takes two
SGD steps: the distillation step, then the cross-entropy step. A test image's logits for the
classes of task i are cosines between its features through branch i and those classes'
prototypes (class means through the same branch, taken when task i ended).

Recipes, sources and deviations: docs/methods/lora.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn import functional as F

from clbench.class_stats import ClassStatistics
from clbench.distributed import reduce_gradients
from clbench.errors import UsageError
from clbench.methods.lora.cl_lora.adapter import (SharedLoRA, SpecificLoRA, pooled, run_blocks,
                                                  teacher_view, tokens, TARGETS)
from clbench.methods.prototype.base import CosineHead, PrototypeConfig, PrototypeStrategy
from clbench.precision import exact
from clbench.registry import register_method
from clbench.requirements import fused_qkv

# Official exps/*.json (init_* = later_*): SGD momentum 0.9, CosineAnnealingLR(T_max=epochs,
# eta_min=0). ImageNet-R (inr.json), ImageNet-A (ina.json), CIFAR-100 (cifar.json); CUB-200 and
# DomainNet have no official config and get ImageNet-R's.
_INR = dict(epochs=20, lr=0.05, batch_size=32, weight_decay=5e-4, min_lr=0.0, rank=10)
BENCHMARK_DEFAULTS = {
    "imagenet-r": _INR,
    "imagenet-a": dict(epochs=25, lr=0.05, batch_size=32, weight_decay=5e-3, min_lr=0.0, rank=10),
    "cifar100": dict(epochs=30, lr=0.03, batch_size=64, weight_decay=1e-4, min_lr=0.0, rank=8),
    "cub200": _INR,
    "domainnet": _INR,
    # Small, fast values for the embedded tiny benchmark (D = 96), not from the paper.
    "digits": dict(epochs=5, lr=0.05, batch_size=32, weight_decay=5e-4, min_lr=0.0, rank=8),
}


@dataclass
class CLLoRAConfig(PrototypeConfig):
    epochs: int = 20
    lr: float = 0.05
    batch_size: int = 32
    weight_decay: float = 5e-4
    rank: int = 10                       # ffn_num
    shared_blocks: Optional[int] = None  # blocks [0, k) shared; None: half the depth (6 of 12)
    kd_weight: float = 5.0               # kd_ratio
    kd_temperature: float = 2.0
    orth_weight: float = 1e-4            # block-weight orthogonality term
    reassign: bool = True                # False: ablation, plain distillation gradient
    # True: the official loop's mixture: the cross-entropy is back-propagated after the
    # distillation step, through forward tensors that alias the parameters it updated
    ce_after_kd_step: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise UsageError(f"cl-lora rank must be a positive integer, got {self.rank}")
        if self.kd_weight < 0 or self.orth_weight < 0 or self.kd_temperature <= 0:
            raise UsageError("cl-lora needs kd_weight >= 0, orth_weight >= 0, kd_temperature > 0")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official ``_KD_loss``: −Σ softmax(t/T)·log_softmax(s/T) / batch (no T² factor)."""
    with exact(student.device):
        student, teacher = full(student), full(teacher)
        log_p = torch.log_softmax(student / temperature, dim=1)
        return -(torch.softmax(teacher / temperature, dim=1) * log_p).sum() / len(student)


def _same(tensor):
    return tensor


def full(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 activations are cast up; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def block_weight_orthogonality(current: torch.Tensor, old: list[torch.Tensor]) -> torch.Tensor:
    """The official ``compute_orthogonality_loss``: mean over old tasks of |cos| between the
    flattened block weights (norms + 1e-8)."""
    if not old:
        return current.new_zeros(())
    unit = current / (current.norm() + 1e-8)
    return sum((unit * (o / (o.norm() + 1e-8))).sum().abs() for o in old) / len(old)


@register_method("cl-lora", "CL-LoRA: shared q/v LoRA (fixed orthogonal down, distilled, "
                            "reassigned gradients) in the first half, per-task LoRA with block "
                            "weights in the second; prototypes per task branch")
class CLLoRA(PrototypeStrategy):
    Config = CLLoRAConfig
    requires = (fused_qkv,)

    recipes = BENCHMARK_DEFAULTS
    fallback_recipe = _INR

    @classmethod
    def validate(cls, config, context) -> None:
        depth = context.backbone_depth
        if depth and not 0 < cls.boundary(config, depth) < depth:
            raise UsageError(f"cl-lora shared_blocks must leave shared and task-specific blocks: "
                             f"0 < shared_blocks < {depth}, got {config.shared_blocks}")
        if config.ce_after_kd_step and context.precision == "bf16":
            raise UsageError("cl-lora ce_after_kd_step needs fp32 or tf32: under bf16 autocast "
                             "the forward keeps cast copies of the weights, not the weights")
        if context.embed_dim and config.rank > context.embed_dim:
            raise UsageError(f"cl-lora rank {config.rank} exceeds the backbone's width "
                             f"{context.embed_dim}")

    @staticmethod
    def boundary(config, depth: int) -> int:
        return depth // 2 if config.shared_blocks is None else config.shared_blocks

    def prepare_model(self, model) -> None:
        model.backbone.requires_grad_(False)
        model.head = CosineHead(model.head.in_features)
        vit, rank = model.backbone, self.config.rank
        self.depth = len(vit.blocks)
        self.split = self.boundary(self.config, self.depth)
        self.shared: list[SharedLoRA] = []
        self.specific: list[SpecificLoRA] = []
        for i, block in enumerate(vit.blocks):
            adapter = (SharedLoRA if i < self.split else SpecificLoRA)(block.attn.qkv, rank)
            (self.shared if i < self.split else self.specific).append(adapter)
            block.attn.qkv = adapter
        self.statistics = ClassStatistics(model.head.in_features, second_moments=False)
        self.task_ranges: list[tuple[int, int]] = []
        self._prototypes = None
        self._kd = None

    def epochs_for_task(self, task: int) -> int:
        return self.config.epochs

    @property
    def forward_passes_per_image(self) -> int:
        """Backbone-equivalents per test image: the shared blocks once, the task-specific blocks
        once per task branch (rounded up)."""
        branches = max(1, len(self.task_ranges))
        return math.ceil((self.split + branches * (self.depth - self.split)) / self.depth)

    # ----------------------------------------------------------------- task boundaries
    def before_task(self, task: int) -> None:
        self.task_ranges.append((self.known_classes, self.model.head.n_classes))
        for adapter in self.specific:
            adapter.add_task()
        self.model.head.start_task()

    def trainable_parameters(self):
        if self.task < 0:
            return []
        shared = [p for a in self.shared for p in a.ups()]
        specific = [p for a in self.specific for p in a.current()]
        return shared + specific + [self.model.head.blocks[-1], self.model.head.sigma]

    def after_task(self, task: int) -> None:
        for adapter in self.specific:  # this task's branch is done; the shared ups go on
            for p in adapter.current():
                p.requires_grad_(False)
        self.collect_statistics(self.statistics, lambda x: self.branch_features(x, task))
        for adapter in self.shared:
            adapter.snapshot()  # the next task's distillation teacher
        self._cache_prototypes()

    def _cache_prototypes(self) -> None:
        self._prototypes = self.statistics.means()[: self.task_ranges[-1][1]].to(
            self.device, torch.float32)

    # ----------------------------------------------------------------- forward passes
    def select(self, task: int) -> None:
        for adapter in self.specific:
            adapter.select(task)

    def branch_features(self, images, task: int):
        self.select(task)
        try:
            return self.model.features(images)
        finally:
            self.select(len(self.task_ranges) - 1)

    def shared_features(self, x):
        """Features after the shared blocks only, then the final norm and pooling (official
        ``forward_general_cls``)."""
        vit = self.model.backbone
        return pooled(vit, run_blocks(vit, tokens(vit, self.model.normalize(x)), range(self.split)))

    def forward(self):
        """With ``ce_after_kd_step`` on a task t ≥ 1: the training forward keeps references to
        the tensors it saves for backward (autograd's version check is skipped), so the
        distillation step's in-place update shows through them, as under torch 2.0.1's foreach
        SGD; the current classes' logits take the proxy rows themselves (the official
        ``CosineLinear`` normalises its weight, not a copy)."""
        if not (self.is_training and self.config.ce_after_kd_step and self.task > 0):
            return super().forward()
        head = self.model.head
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            unit = F.normalize(self.model.features(self.mb_x), dim=1)
            current = head.sigma * F.linear(unit, F.normalize(head.blocks[-1], dim=1))
        with torch.no_grad():
            old = [head.sigma * F.linear(unit, F.normalize(b, dim=1)) for b in head.blocks[:-1]]
        return torch.cat(old + [current], dim=1)

    def predict(self, images):
        """Class-i logits: cos(branch-i features, prototypes of task i's classes), σ = 1."""
        vit = self.model.backbone
        trunk = run_blocks(vit, tokens(vit, self.model.normalize(images)), range(self.split))
        parts = []
        try:
            for i, (start, stop) in enumerate(self.task_ranges):
                self.select(i)
                f = pooled(vit, run_blocks(vit, trunk, range(self.split, self.depth)))
                with exact(images.device):
                    parts.append(F.normalize(f.float(), dim=1)
                                 @ F.normalize(self._prototypes[start:stop], dim=1).T)
        finally:
            self.select(len(self.task_ranges) - 1)
        return torch.cat(parts, dim=1)

    # ----------------------------------------------------------------- the two steps
    def extra_loss(self):
        if self.task < 1 or not self.config.orth_weight:
            return 0.0
        current = torch.cat([a.scales[-1] for a in self.specific])
        old = [torch.cat([a.scales[k] for a in self.specific]) for k in range(self.task)]
        return self.config.orth_weight * block_weight_orthogonality(full(current), [full(o) for o in old])

    def criterion(self):
        loss = super().criterion()
        self._kd = None
        if self.is_training and self.task > 0 and self.config.kd_weight:
            student = self.shared_features(self.mb_x)
            with torch.no_grad(), teacher_view(self.shared):
                teacher = self.shared_features(self.mb_x)
            head, known = self.model.head, self.known_classes
            self._kd = self.config.kd_weight * kd_loss(
                head(student)[:, known:], head(teacher)[:, known:], self.config.kd_temperature)
        return loss

    def backward(self):
        """Task t ≥ 1: the distillation step (gradients reassigned row-wise on the shared
        up-projections), then the template's cross-entropy step. By default both gradients are
        taken at the batch's weights; ``ce_after_kd_step`` back-propagates the cross-entropy
        after the distillation step instead (the official mixture, see ``forward``)."""
        if self._kd is None:
            return super().backward()
        params = self.trainable_parameters()
        kd_grads = torch.autograd.grad(self._kd, params, allow_unused=True)
        self._finite &= torch.isfinite(self._kd.detach()).all()
        self._kd = None
        if self.config.ce_after_kd_step:
            self.distillation_step(params, kd_grads)
            for p in params:
                p.grad = None
            return super().backward()
        super().backward()
        ce_grads = [p.grad for p in params]
        self.distillation_step(params, kd_grads)
        for p, g in zip(params, ce_grads):
            p.grad = g

    def distillation_step(self, params, grads) -> None:
        for p, g in zip(params, grads):
            p.grad = g
        if self.config.reassign:
            self.reassign_gradients()
        reduce_gradients([p for p in params if p.grad is not None], len(self.mb_y))
        self.optimizer.step()

    @torch.no_grad()
    def reassign_gradients(self) -> None:
        for adapter in self.shared:
            for target, up in zip(TARGETS, adapter.ups()):
                weights = adapter.reassignment_weights(target)
                if weights is not None and up.grad is not None:
                    up.grad.mul_(weights.to(up.grad).unsqueeze(1))

    # ----------------------------------------------------------------- checkpoints
    def task_info(self) -> dict:
        return {"branches": len(self.task_ranges), "shared_blocks": self.split,
                "forward_passes": self.forward_passes_per_image}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "task_ranges": [list(r) for r in self.task_ranges],
                "statistics": self.statistics.state_dict()}

    def restore_structure(self, state: dict) -> None:
        super().restore_structure(state)
        self.task_ranges = [tuple(r) for r in state["task_ranges"]]
        for _ in self.task_ranges:
            for adapter in self.specific:
                adapter.add_task()
        for adapter in self.specific:
            for p in adapter.parameters():
                p.requires_grad_(False)
        self.statistics.load_state_dict(state["statistics"])
        if self.task_ranges:
            self._cache_prototypes()
