"""LoRA-Sub-DRS (Liu & Chang, "LoRA Subtraction for Drift-Resistant Space in Exemplar-Free
Continual Learning", CVPR 2025; official code scarlet0703/LoRA-Sub-DRS, read here in the
fork DngBack/LoRA-Sub-DRS at its import commit 871d29c: ``methods/lorasub_drs.py``,
``models/vit_lora.py``, ``optimgrad/adam_proj.py``, ``utils/losses.py``, ``configs/*.json``).

Each task trains a fresh rank-r LoRA pair on the k and v slices of every block's fused qkv
(A kaiming-uniform, B one N(0, 0.01) entry per column, no scaling) on top of the folded earlier pairs:

    k = (W_k + Σ_{j<t} B_j A_j + B_t A_t) x        (same for v)

Before task t ≥ 1 the earlier pairs are *subtracted* (W − Σ_{j<t} B_j A_j, the drift-resistant
space) and the task's data is passed through that network to take each layer's input second
moment S (``clbench.methods.lora.subspace.SecondMoments``). Adam's updates of A_t and B_t are
then projected onto the leading singular directions of S (``subspace.spectral_basis``). The loss
is the current task's cross-entropy plus λ × an augmented triplet loss whose negatives include
the normalised prototypes of old classes; a test image is classified by cosine to the class
prototypes (nearest normalised class mean).

Recipes, sources and deviations: docs/methods/lora.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn
from torch.nn import functional as F

from clbench.adapters import SLICE_INDEX, QKVAdapter, install_qkv_adapters, merged
from clbench.class_stats import ClassStatistics, StatisticsOptions, collect
from clbench.errors import UsageError
from clbench.hparams import TrainConfig
from clbench.methods.lora.inflora.strategy import InfLoRA
from clbench.methods.lora.subspace import SecondMoments, spectral_basis
from clbench.methods.prototype.base import cosine_logits
from clbench.precision import exact
from clbench.registry import register_method
from clbench.requirements import fused_qkv
from clbench.schedules import cosine_factor
from clbench.strategy import CLStrategy

TARGETS = ("k", "v")


class SubtractableLoRA(QKVAdapter):
    """k/v pairs of one block: trained ``down_*`` (A, r × D) and ``up_*`` (B, D × r), the folded
    earlier pairs in ``old_delta`` (2 × D × D), and ``subtracted``: W − old_delta, no current pair
    (the drift-resistant space the input statistics are taken in)."""

    def __init__(self, qkv: nn.Linear, rank: int):
        super().__init__(qkv, TARGETS)
        kw = dict(device=qkv.weight.device, dtype=qkv.weight.dtype)
        for t in TARGETS:
            setattr(self, f"down_{t}", nn.Parameter(torch.zeros(rank, self.dim, **kw)))
            setattr(self, f"up_{t}", nn.Parameter(torch.zeros(self.dim, rank, **kw)))
        self.register_buffer("old_delta", torch.zeros(2, self.dim, self.dim, **kw))
        self.subtracted = False

    def pair(self, target):
        return getattr(self, f"down_{target}"), getattr(self, f"up_{target}")

    def slice_delta(self, x, target):
        old = F.linear(x, self.old_delta[SLICE_INDEX[target] - 1])
        if self.subtracted:
            return -old
        down, up = self.pair(target)
        return old + F.linear(F.linear(x, down), up)

    def slice_delta_weight(self, target):
        old = self.old_delta[SLICE_INDEX[target] - 1]
        if self.subtracted:
            return -old
        down, up = self.pair(target)
        return old + up @ down

    @torch.no_grad()
    def start_task(self) -> None:
        """A fresh pair as the official ``init_param``: A kaiming-uniform(a=√5) as ``nn.Linear``;
        B ``sparse_`` with sparsity 1 − 1/D, i.e. one N(0, 0.01) entry per column (LoRA's zero B
        would give A no gradient on the first step)."""
        for t in TARGETS:
            down, up = self.pair(t)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            nn.init.sparse_(up, sparsity=1 - 1 / self.dim)

    @torch.no_grad()
    def fold(self) -> None:
        with exact(self.old_delta.device):
            for t in TARGETS:
                down, up = self.pair(t)
                self.old_delta[SLICE_INDEX[t] - 1] += up @ down
                up.zero_()  # the folded pair no longer adds anything of its own


class ProjectedAdam(torch.optim.Optimizer):
    """The official ``optimgrad/adam_proj.py`` Adam (Adam-NSCL form: step lr·√(1−β₂ᵗ)/(1−β₁ᵗ), ε added to √v̂ unscaled) whose
    update of a parameter with a ``transforms`` entry T (D × D) is projected: U·T for a down
    (r × D), T·U for an up (D × r)."""

    def __init__(self, groups, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(groups, dict(betas=betas, eps=eps, weight_decay=0.0))
        self.transforms: dict[nn.Parameter, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad + group["weight_decay"] * p
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                update = -step * m / (v.sqrt() + group["eps"])
                transform = self.transforms.get(p)
                if transform is not None:
                    with exact(p.device):
                        t = transform.to(update)
                        update = t @ update if update.shape[0] == t.shape[0] else update @ t
                p.add_(update)


def projection(basis: torch.Tensor) -> torch.Tensor:
    """T = V Vᵀ / ‖V Vᵀ‖_F (= V Vᵀ / √k) over the basis V (the official ``get_transforms``)."""
    transform = basis @ basis.T
    return transform / torch.linalg.matrix_norm(transform)


def augmented_triplet_loss(features, labels, prototypes, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss on unit features (hardest positive, hardest negative; the anchor's
    own distance is √1e-12), with the unit old-class prototypes as further negatives; a batch of
    one class uses the hardest positive + margin as its negative. Mean of relu(ap − an + m)."""
    with exact(features.device):
        f = features.float()
        sq = f.pow(2).sum(1, keepdim=True)
        dist = (sq + sq.T - 2 * f @ f.T).clamp(min=1e-12).sqrt()
        same = labels[:, None] == labels[None, :]
        ap = dist.masked_fill(~same, float("-inf")).max(1).values
        an = dist.masked_fill(same, float("inf")).min(1).values
        an = torch.where(same.all(1), ap + margin, an)
        if len(prototypes):
            c = F.normalize(prototypes.to(f), dim=1)
            an = torch.minimum(an, (f[:, None] - c[None]).norm(dim=2).clamp(min=1e-12).min(1).values)
        return F.relu(ap - an + margin).mean()


# Official configs/*.json: Adam 5e-4 (init_lr = lrate), no weight decay, batch 128, rank 10,
# CosineSchedule(K=epochs). imagenetr.json (B20-Inc20; 40 epochs on the first task), cub.json,
# domainnet.json, cifar100.json (B5-Inc5: λ 0.05); CIFAR-100 with 10 tasks (λ 0.05431) from
# LibContinual's lora_sub-cifar100-b10-10-10. ImageNet-A has no config and gets ImageNet-R's.
_INR = dict(epochs=50, first_epochs=40, lr=5e-4, head_lr=5e-4, batch_size=128, rank=10,
            margin=2.0, triplet_weight=0.2)
BENCHMARK_DEFAULTS = {
    "imagenet-r": _INR, "imagenet-a": _INR,
    "cub200": dict(epochs=20, lr=5e-4, head_lr=1e-3, batch_size=128, rank=10, margin=1.0,
                   triplet_weight=0.2),
    "domainnet": dict(epochs=5, lr=5e-4, head_lr=1e-3, batch_size=128, rank=40, margin=2.0,
                      triplet_weight=0.1),
    "cifar100": dict(epochs=20, lr=5e-4, head_lr=2e-3, batch_size=128, rank=10, margin=1.0,
                     triplet_weight=0.05431),
    # Small, fast values for the embedded tiny benchmark (D = 96), not from the paper.
    "digits": dict(epochs=5, lr=5e-3, head_lr=5e-3, batch_size=32, rank=8, margin=1.0,
                   triplet_weight=0.1),
}


@dataclass
class LoRASubDRSConfig(StatisticsOptions, TrainConfig):
    lr_scaled_fields: ClassVar[tuple[str, ...]] = ("head_lr",)
    epochs: int = 50
    first_epochs: Optional[int] = None  # the first task's (init_epoch), capped by epochs; None: epochs
    lr: float = 5e-4
    head_lr: float = 5e-4               # fc_lrate
    batch_size: int = 128
    rank: int = 10
    share: float = 0.99                 # thres: singular-value share the projection keeps
    margin: float = 2.0                 # margin_inter
    triplet_weight: float = 0.2         # lambada
    project: bool = True                # False: ablation, no drift-resistant projection

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1 or not 0 < self.share <= 1 or self.lr <= 0 or self.head_lr <= 0:
            raise UsageError("lora-sub-drs needs rank >= 1, 0 < share <= 1, lr > 0, head_lr > 0")
        if self.margin < 0 or self.triplet_weight < 0:
            raise UsageError("lora-sub-drs needs margin >= 0 and triplet_weight >= 0")
        if self.first_epochs is not None and self.first_epochs < 0:
            raise UsageError("lora-sub-drs first_epochs must be >= 0 (or None: epochs)")


@register_method("lora-sub-drs", "LoRA-Sub-DRS: k/v LoRA trained in the drift-resistant space "
                                 "(old LoRA subtracted, updates projected on its input "
                                 "subspace), triplet loss, cosine to prototypes, 1 forward pass")
class LoRASubDRS(CLStrategy):
    Config = LoRASubDRSConfig
    requires = (fused_qkv,)

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        defaults = dict(BENCHMARK_DEFAULTS.get(benchmark, _INR))
        if benchmark == "cifar100" and n_tasks == 20:
            defaults["triplet_weight"] = 0.05  # configs/cifar100.json
        return defaults

    @classmethod
    def validate(cls, config, context) -> None:
        InfLoRA.validate.__func__(cls, config, context)  # rank <= width

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        self.adapters = install_qkv_adapters(
            model.backbone, lambda index, qkv: SubtractableLoRA(qkv, self.config.rank))
        self.statistics = ClassStatistics(model.head.in_features, second_moments=False)
        self.moments: list[torch.Tensor] | None = None
        self.basis_dims: list[int] = []
        self._prototypes = None

    def epochs_for_task(self, task: int) -> int:
        """The first task's ``first_epochs`` (capped by ``epochs``, so ``--epochs`` bounds every
        task), then ``epochs``."""
        first, epochs = self.config.first_epochs, self.config.epochs
        return min(first, epochs) if task == 0 and first is not None else epochs

    # ----------------------------------------------------------------- task boundaries
    @torch.no_grad()
    def drift_resistant_moments(self) -> list[torch.Tensor]:
        """S per layer over this task's training loader through W − Σ old pairs."""
        was_training = self.model.training
        self.model.eval()
        for a in self.adapters:
            a.subtracted = True
        try:
            with merged(self.model), SecondMoments(self.adapters) as moments:
                for batch in self.dataloader:
                    self.model.features(batch[0].to(self.device))
        finally:
            for a in self.adapters:
                a.subtracted = False
            self.model.train(was_training)
        return moments.matrices()

    def before_task(self, task: int) -> None:
        InfLoRA.init_new_head_rows(self)
        for adapter in self.adapters:
            adapter.start_task()
        cfg = self.config  # share = 1: no projection, as the official thres == 1.0
        project = task > 0 and cfg.project and cfg.share < 1
        self.moments = self.drift_resistant_moments() if project else None

    def after_task(self, task: int) -> None:
        for adapter in self.adapters:
            adapter.fold()
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            collect(self.statistics, self.model.features,
                    self.statistics_loader(self.config.stats_transform), self.device,
                    range(self.known_classes, self.model.head.n_classes))
        self.model.train(was_training)
        self._cache_prototypes()

    def _cache_prototypes(self) -> None:
        self._prototypes = self.statistics.means()[: self.model.head.n_classes].to(
            self.device, torch.float32)

    # ----------------------------------------------------------------- optimisation
    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters for t in TARGETS for p in a.pair(t)]

    def trainable_parameters(self):
        return self.lora_parameters() + list(self.model.head.parameters())

    def make_optimizer_for_task(self, params):
        cfg = self.config
        head = list(self.model.head.parameters())
        optimizer = ProjectedAdam([{"params": self.lora_parameters(), "lr": cfg.lr},
                                   {"params": head, "lr": cfg.head_lr}])
        self.basis_dims = []
        if self.moments is not None:
            for adapter, s_mat in zip(self.adapters, self.moments):
                basis = spectral_basis(s_mat, cfg.share)
                transform = projection(basis)
                self.basis_dims.append(int(basis.shape[1]))
                for t in TARGETS:
                    for p in adapter.pair(t):
                        optimizer.transforms[p] = transform.to(p.device, p.dtype)
            self.moments = None
        return optimizer

    def make_scheduler_for_task(self, optimizer):
        """The official CosineSchedule(K = epochs), stepped per epoch, on the first task too."""
        epochs = self.config.epochs
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: cosine_factor(e, epochs))

    def forward(self):
        if not self.is_training:
            return cosine_logits(self.model.features(self.mb_x), self._prototypes)
        self._features = self.model.features(self.mb_x)
        return self.model.head(self._features)

    def extra_loss(self):
        if not self.config.triplet_weight:
            return 0.0
        old = self._prototypes[: self.known_classes] if self._prototypes is not None else \
            self._features.new_zeros(0, self._features.shape[1])
        unit = self._features / self._features.norm(dim=-1, keepdim=True)
        return self.config.triplet_weight * augmented_triplet_loss(
            unit, self.mb_y, old, self.config.margin)

    # ----------------------------------------------------------------- checkpoints
    def task_info(self) -> dict:
        return {"basis_dims": list(self.basis_dims)}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "statistics": self.statistics.state_dict(),
                "basis_dims": list(self.basis_dims)}

    def restore_structure(self, state: dict) -> None:
        super().restore_structure(state)
        self.statistics.load_state_dict(state["statistics"])
        self.basis_dims = list(state.get("basis_dims", []))
        if self.model.head.n_classes:
            self._cache_prototypes()
