"""SLCA++ (Zhang et al., "SLCA++: Unleash the Power of Sequential Fine-tuning for Continual
Learning with Pre-training", arXiv 2408.08295, 2024; official code GengDavid/SLCA,
``models/slca_pp.py`` and the LoRA ViT of ``convs/vits.py``).

The slow learner made parameter-efficient ("hybrid SL"): one LoRA (rank 4, scale 0.8) on every
block's ``attn.qkv``, ``mlp.fc1`` and ``mlp.fc2``, shared by all tasks and never reset, whose A is
set at the first task to the top right singular vectors of the pretrained weight (B zero); with
it train every LayerNorm, every bias and the class token. Groups: LoRA at ``lr × 0.5`` in the first
task and ``lr × backbone_lr_scale`` later, the other backbone parameters at
``lr × backbone_lr_scale``, the head at ``lr``; CosineAnnealingLR per epoch down to
``lr × backbone_lr_scale × lr_decay^len(milestones)``. Loss: symmetric cross-entropy
``sce_a·CE + sce_b·RCE`` of the current task's logits. Alignment as SLCA's but without the mean
shrink: each sample of a class learnt k tasks ago is scaled by 1/(1 + s·k), s ~ U(μ ± 0.01); at
inference the features reaching that task's head rows are scaled by 1 + μ·k.

Recipe, sources and deviations: docs/methods/slow_learner.md
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from clbench.alignment import ClassGaussians
from clbench.errors import UsageError
from clbench.methods.slow_learner.base import SlowLearner, SlowLearnerConfig
from clbench.precision import exact
from clbench.registry import register_method

LORA_TARGETS = ("attn.qkv", "mlp.fc1", "mlp.fc2")


class LoRALinear(nn.Module):
    """``F.linear(x, W + scale·B A, b)`` around a frozen ``nn.Linear`` (official ``LoraMlp`` /
    ``LoraAttention``); ``merge()`` caches the summed weight for evaluation."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_A = nn.Parameter(base.weight.new_zeros(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        self._merged: torch.Tensor | None = None

    @torch.no_grad()
    def init_from_weight(self) -> None:
        """A = the top-``rank`` right singular vectors of the pretrained weight (``init_lora``)."""
        _, _, vh = torch.linalg.svd(self.base.weight.float())
        self.lora_A.copy_(vh[: self.lora_A.shape[0]].to(self.lora_A))

    def weight(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A * self.scale + self.base.weight

    @property
    def merged(self) -> bool:
        return self._merged is not None

    def merge(self) -> None:
        with torch.no_grad(), exact(self.base.weight.device):
            self._merged = self.weight()

    def unmerge(self) -> None:
        self._merged = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged is not None:
            return F.linear(x, self._merged, self.base.bias)
        return F.linear(x, self.weight(), self.base.bias)


def lora_linears(backbone, config, context) -> str | None:
    """``requires`` entry: every block's ``attn.qkv``, ``mlp.fc1`` and ``mlp.fc2`` are Linears."""
    blocks = getattr(backbone, "blocks", None)
    if not blocks:
        return "it has no transformer blocks"
    for index, block in enumerate(blocks):
        for path in LORA_TARGETS:
            try:
                module = block.get_submodule(path)
            except AttributeError:
                module = None
            if not isinstance(module, nn.Linear):
                return f"block {index} has no {path} Linear for SLCA++'s LoRA"
    return None


def hybrid_trainable(name: str) -> bool:
    """The official hybrid slow learner's rule on backbone parameter names."""
    return any(key in name for key in ("norm", "bias", "cls_token", "lora"))


def symmetric_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, a: float,
                            b: float) -> torch.Tensor:
    """a·CE + b·RCE with the official clamps: RCE = −Σ_k p_k log(clamp(onehot_k, 1e-4, 1)),
    p = clamp(softmax, 1e-7, 1)."""
    with exact(logits.device):
        logits = logits.float()
        ce = F.cross_entropy(logits, targets)
        pred = F.softmax(logits, dim=1).clamp(min=1e-7, max=1.0)
        one_hot = F.one_hot(targets, logits.shape[1]).float().clamp(min=1e-4, max=1.0)
        rce = -(pred * torch.log(one_hot)).sum(dim=1)
        return a * ce + b * rce.mean()


class _ScaledSamples:
    """Samples of one class's Gaussian, each scaled by 1 / (1 + s·age), s ~ U(μ − 0.01, μ + 0.01)
    drawn right after the class's samples (the official order of random draws)."""

    def __init__(self, gaussian, mu: float, age: int):
        self.gaussian, self.mu, self.age = gaussian, mu, age

    def sample(self, shape) -> torch.Tensor:
        x = self.gaussian.sample(shape)
        s = self.mu + 0.02 * (torch.rand(x.shape[0], device=x.device) - 0.5)
        return (1 / (1 + s * self.age)).unsqueeze(1) * x


class ScaledClassGaussians(ClassGaussians):
    """SLCA++'s alignment samples: the class mean as stored (no shrink), samples scaled by age."""

    def __init__(self, dim: int, ridge: float, mu: float):
        super().__init__(dim, ridge)
        self.mu = mu

    def mean_scale(self, c: int, task: int) -> float:
        return 1.0

    def gaussian(self, c: int, task: int, device):
        return _ScaledSamples(super().gaussian(c, task, device), self.mu,
                              task - self.class_task[c])


@dataclass
class SLCAppConfig(SlowLearnerConfig):
    # Official exps/slcapp/slcapp_imgnetr_lora.json
    backbone_lr_scale: float = 0.1
    weight_decay: float = 0.0
    ca_weight_decay: float = 0.0      # the same module constant as weight_decay
    lora_rank: int = 4
    lora_scale: float = 0.8           # hard-coded in convs/vits.py
    first_lora_lr_scale: float = 0.5  # hard-coded in models/slca_pp.py (first task only)
    sce_a: float = 0.5
    sce_b: float = 0.5
    fc_scale_mu: float = 0.02

    def __post_init__(self):
        super().__post_init__()
        if self.lora_rank < 1 or self.first_lora_lr_scale <= 0:
            raise UsageError("slca-pp: lora_rank must be >= 1 and first_lora_lr_scale > 0")
        if self.sce_a < 0 or self.sce_b < 0 or self.sce_a + self.sce_b == 0 or self.fc_scale_mu < 0:
            raise UsageError("slca-pp: sce_a, sce_b >= 0 (not both 0) and fc_scale_mu >= 0")


# Official exps/slcapp/slcapp_{cifar,imgnetr,cub}_lora.json (ViT-B/16 IN-21k); the CUB file sets
# no weight_decay, so models/slca_pp.py's 5e-4 applies (to training and alignment).
_IMAGENET_R = dict(epochs=50, milestones=[40], ca_temperature=0.1, weight_decay=0.0,
                   ca_weight_decay=0.0, sce_a=0.5, sce_b=0.5)
BENCHMARK_DEFAULTS = {
    "cifar100": dict(epochs=20, milestones=[18], ca_temperature=0.1, weight_decay=5e-4,
                     ca_weight_decay=5e-4, sce_a=1.0, sce_b=0.1),
    "imagenet-r": _IMAGENET_R,
    "imagenet-a": _IMAGENET_R,
    "cub200": dict(epochs=50, milestones=[40], ca_temperature=0.1, weight_decay=5e-4,
                   ca_weight_decay=5e-4, sce_a=1.0, sce_b=0.1),
    "domainnet": _IMAGENET_R,
    # Small, fast values for the embedded tiny benchmark (D = 96), not from the paper.
    "digits": dict(epochs=5, batch_size=32, milestones=[4], ca_weight_decay=0.0),
}


@register_method("slca-pp", "SLCA++: hybrid slow learner (shared LoRA + norms/biases/cls token), "
                            "symmetric cross-entropy, classifier alignment with feature scaling, "
                            "1 forward pass (merged)")
class SLCApp(SlowLearner):
    """Parameter-efficient slow learner; see the module docstring."""

    Config = SLCAppConfig
    requires = (lora_linears,)

    recipes = BENCHMARK_DEFAULTS

    def select_backbone(self, backbone: nn.Module) -> None:
        c = self.config
        self.loras = []
        for block in backbone.blocks:
            for path in LORA_TARGETS:
                parent_path, _, leaf = path.rpartition(".")
                parent = block.get_submodule(parent_path)
                lora = LoRALinear(getattr(parent, leaf), c.lora_rank, c.lora_scale)
                setattr(parent, leaf, lora)
                self.loras.append(lora)
        for name, p in backbone.named_parameters():
            p.requires_grad_(hybrid_trainable(name))

    def make_gaussians(self, dim: int) -> ClassGaussians:
        return ScaledClassGaussians(dim, self.config.cov_ridge, self.config.fc_scale_mu)

    def before_task(self, task: int) -> None:
        super().before_task(task)
        if task == 0:
            for lora in self.loras:
                lora.init_from_weight()

    def backbone_groups(self) -> list[dict]:
        c, named = self.config, list(self.model.backbone.named_parameters())
        lora_lr = c.lr * (c.first_lora_lr_scale if self.task == 0 else c.backbone_lr_scale)
        pick = lambda keep: [p for n, p in named if p.requires_grad and keep(n)]  # noqa: E731
        return [{"params": pick(lambda n: "lora_A" in n), "lr": lora_lr},
                {"params": pick(lambda n: "lora_B" in n), "lr": lora_lr},
                {"params": pick(lambda n: "lora" not in n), "lr": c.lr * c.backbone_lr_scale}]

    def make_scheduler_for_task(self, optimizer):
        c = self.config
        floor = c.lr * c.backbone_lr_scale * c.lr_decay ** len(c.milestones)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=c.epochs, eta_min=floor)

    def criterion(self):
        if not self.is_training:
            return super().criterion()
        known = self.known_classes
        loss = symmetric_cross_entropy(self.mb_output[:, known:], self.mb_y - known,
                                       self.config.sce_a, self.config.sce_b)
        return loss + self.extra_loss()

    def feature_scales(self) -> torch.Tensor | None:
        """Per class, 1 + μ·(tasks since the class was learnt), once the head is aligned
        (official ``update_scale``); ``None`` when every scale is 1."""
        c = self.config
        if self.task < 1 or c.ca_epochs == 0 or c.fc_scale_mu == 0:
            return None
        age = self.task - torch.tensor(self.gaussians.class_task, dtype=torch.float32)
        return 1 + c.fc_scale_mu * age

    def forward(self):
        scales = None if self.is_training else self.feature_scales()
        if scales is None:
            return super().forward()
        fc = self.model.head.fc
        features = self.model.features(self.mb_x)
        return F.linear(features, fc.weight) * scales.to(features) + fc.bias.to(features.dtype)
