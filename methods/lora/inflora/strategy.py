"""InfLoRA (Liang & Li, CVPR 2024; official code liangyanshuo/InfLoRA): interference-free LoRA.

Each task t adds a rank-r branch to the key and value slices of every block's fused qkv:

    k = W_k x + Σ_{j≤t} Up^k_j Down_j x ,   v = W_v x + Σ_{j≤t} Up^v_j Down_j x     (no scaling)

Down_t (r × D, shared by k and v of a layer) is *designed* in ``before_task`` from the task's
input second moments projected out of the stored old-task subspace, then frozen; Up^k_t, Up^v_t
start at zero and are the only trained backbone tensors. ``after_task`` updates the GPM/DualGPM
memory (``clbench.methods.lora.subspace``); both passes run inside ``strategy.train()``, so they
are timed. Finished branches are folded into one frozen delta per slice, and evaluation runs
merged. (The paper calls the designed matrix B_t and the trained one A_t; the official code, like
this file, the other way.)

Recipe, sources and deviations: docs/methods/lora.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from clbench.adapters import install_qkv_adapters, merged
from clbench.errors import UsageError
from clbench.hparams import TrainConfig
from clbench.methods.lora.inflora.adapter import InfLoRAAdapter
from clbench.methods.lora.subspace import LayerMemory, SecondMoments, design_down, threshold
from clbench.registry import register_method
from clbench.requirements import fused_qkv
from clbench.schedules import cosine_per_epoch
from clbench.strategy import CLStrategy

DOWN_SCALE = 1 / math.sqrt(3)  # hard-coded in the official code

# Official configs (configs/*_inflora.json); ImageNet-A / CUB-200 have none: ImageNet-R's.
_IMAGENET_R = dict(epochs=50, lr=5e-4, batch_size=128, rank=10, lambda_b=0.98)
BENCHMARK_DEFAULTS = {
    "cifar100": dict(epochs=20, lr=5e-4, batch_size=128, rank=10, lambda_b=0.95),
    "imagenet-r": _IMAGENET_R,
    "imagenet-a": _IMAGENET_R,
    "cub200": _IMAGENET_R,
    "domainnet": dict(epochs=5, lr=5e-3, head_lr=1e-2, batch_size=128, rank=30, lambda_b=0.95,
                      optimizer="sgd", schedule="step", memory="gpm"),
    # Small, fast values for the embedded tiny benchmark (D = 96), not from the paper.
    "digits": dict(epochs=5, lr=1e-2, batch_size=32, rank=8, lambda_b=0.95),
}


OPTIONS = {"optimizer": ("adam", "sgd"), "schedule": ("cosine", "step", "annealing"),
           "memory": ("dual", "gpm")}


@dataclass
class InfLoRAConfig(TrainConfig):
    lr_scaled_fields: ClassVar[tuple[str, ...]] = ("head_lr",)  # --lr scales it like lr
    epochs: int = 20
    lr: float = 5e-4
    batch_size: int = 128
    rank: int = 10
    lambda_b: float = 0.95            # threshold at task 0
    lambda_e: float = 1.0             # threshold limit at t = T
    optimizer: str = "adam"           # "adam" (β 0.9/0.999) or "sgd" (momentum 0.9)
    weight_decay: float = 0.0
    # "cosine": official CosineSchedule, epoch e at lr·cos(99π·max(e−1,0)/(200(K−1)));
    # "step": ×0.1 at step_epoch;
    # "annealing": torch CosineAnnealingLR(T_max=epochs) (official SGD runs of InfLoRA+CA)
    schedule: str = "cosine"
    step_epoch: int = 4
    head_lr: Optional[float] = None   # None: same as lr (official DomainNet: 1e-2)
    memory: str = "dual"              # "dual" (DualGPM) or "gpm" (remove mode only)
    project: bool = True              # False: ablation, Down_t from the unprojected S_t

    def __post_init__(self):
        for name, options in OPTIONS.items():
            if getattr(self, name) not in options:
                raise UsageError(f"inflora {name} must be one of {', '.join(options)}, "
                                 f"got {getattr(self, name)!r}")
        if self.rank < 1:
            raise UsageError(f"inflora rank must be a positive integer, got {self.rank}")
        if not 0 < self.lambda_b <= self.lambda_e <= 1:
            raise UsageError(f"inflora thresholds need 0 < lambda_b <= lambda_e <= 1, got "
                             f"lambda_b={self.lambda_b}, lambda_e={self.lambda_e}")
        if self.head_lr is not None and self.head_lr <= 0:
            raise UsageError(f"inflora head_lr must be positive (or None: same as lr), got {self.head_lr}")
        if self.weight_decay < 0 or self.step_epoch < 0:
            raise UsageError("inflora weight_decay and step_epoch must be non-negative")


@register_method("inflora", "InfLoRA: k/v LoRA with a designed down-projection orthogonal to "
                            "old tasks' input subspace (DualGPM memory), 1 forward pass")
class InfLoRA(CLStrategy):
    Config = InfLoRAConfig
    forward_passes_per_image = 1
    requires = (fused_qkv,)

    recipes = BENCHMARK_DEFAULTS

    @classmethod
    def validate(cls, config, context) -> None:
        if context.embed_dim and config.rank > context.embed_dim:
            raise UsageError(f"{cls.registered_name} rank {config.rank} exceeds the backbone's "
                             f"width {context.embed_dim}: set --set {cls.registered_name}.rank=<= "
                             f"{context.embed_dim}")

    def prepare_model(self, model) -> None:
        cfg = self.config
        super().prepare_model(model)
        self.adapters = install_qkv_adapters(
            model.backbone, lambda index, qkv: InfLoRAAdapter(qkv, cfg.rank))
        self.memories = [LayerMemory(a.dim, dual=cfg.memory == "dual") for a in self.adapters]
        self.last_threshold = None

    # ----------------------------------------------------------------- task boundaries
    @torch.no_grad()
    def second_moments(self) -> list[torch.Tensor]:
        """S per adapted layer over the current task's training loader (current network; merged
        for the pass, since it is inference)."""
        was_training = self.model.training
        self.model.eval()
        with merged(self.model), SecondMoments(self.adapters) as moments:
            for batch in self.dataloader:
                self.model.features(batch[0].to(self.device))
        self.model.train(was_training)
        return moments.matrices()

    def before_task(self, task: int) -> None:
        self.init_new_head_rows()
        for adapter, memory, s_mat in zip(self.adapters, self.memories, self.second_moments()):
            basis = memory.projection_basis() if self.config.project else None
            down = design_down(s_mat, basis, memory.retain, self.config.rank, DOWN_SCALE)
            adapter.start_task(down.to(adapter.down))

    @torch.no_grad()
    def init_new_head_rows(self) -> None:
        """The official per-task heads are default-initialised ``nn.Linear``s (weight and bias
        U(±1/√D)); the shared head's new rows are re-drawn the same way."""
        fc, known = self.model.head.fc, self.known_classes
        fresh = nn.Linear(fc.in_features, fc.out_features - known)
        fc.weight[known:] = fresh.weight.to(fc.weight)
        fc.bias[known:] = fresh.bias.to(fc.bias)

    def after_task(self, task: int) -> None:
        for adapter in self.adapters:
            adapter.fold()
        eps = threshold(self.config.lambda_b, self.config.lambda_e, task, self.context.n_tasks)
        for memory, s_mat in zip(self.memories, self.second_moments()):
            memory.update(s_mat, eps)
        self.last_threshold = eps

    def task_info(self) -> dict:
        return {"threshold": self.last_threshold,
                "basis_dims": [m.basis.shape[1] for m in self.memories],
                "retain": [int(m.retain) for m in self.memories]}

    # ----------------------------------------------------------------- optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        ups = [p for a in self.adapters for p in (a.up_k, a.up_v)]
        return ups + list(self.model.head.parameters())

    def make_optimizer_for_task(self, params):
        """Up-projections at ``lr``, head at ``head_lr``. Weight decay reaches only the current
        task's head rows (official: old heads are frozen), so for the head it is the equivalent
        L2 term in ``extra_loss`` rather than the optimiser's decay of the whole shared matrix."""
        head = list(self.model.head.parameters())
        head_ids = {id(p) for p in head}
        cfg = self.config
        groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": cfg.lr,
                   "weight_decay": cfg.weight_decay},
                  {"params": head, "lr": cfg.head_lr or cfg.lr, "weight_decay": 0.0}]
        if cfg.optimizer == "adam":
            return torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.999))
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)

    def extra_loss(self):
        if not self.config.weight_decay:
            return 0.0
        return 0.5 * self.config.weight_decay * self.model.head.squared_norm_from(
            self.known_classes)

    def make_scheduler_for_task(self, optimizer):
        if self.config.schedule == "cosine":
            return cosine_per_epoch(optimizer, self.config.epochs)
        if self.config.schedule == "annealing":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.config.epochs)
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [self.config.step_epoch], 0.1)

    # ----------------------------------------------------------------- checkpoints
    def extra_state(self) -> dict:
        state = super().extra_state()
        state["memories"] = [m.state() for m in self.memories]
        if self.last_threshold is not None:
            state["last_threshold"] = self.last_threshold
        return state

    def restore_structure(self, state: dict) -> None:
        super().restore_structure(state)
        for memory, saved in zip(self.memories, state["memories"]):
            memory.load(saved)
        self.last_threshold = state.get("last_threshold")
