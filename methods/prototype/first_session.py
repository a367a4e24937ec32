"""First-session tuning shared by APER and RanPAC: parallel adapters (or SSF) and a cosine head
tuned on the first task only, then frozen (RevisitingCIL ``models/aper_adapter.py``/``ssf.py``,
RanPAC ``RanPAC.py``). The per-benchmark recipe is APER's (``exps/aper_adapter/*.json``)."""
from __future__ import annotations

from dataclasses import dataclass

from clbench.errors import UsageError
from clbench.methods.prototype import parallel_adapter, ssf
from clbench.methods.prototype.base import CosineHead, PrototypeConfig, PrototypeStrategy

CIFAR_RECIPE = dict(epochs=20, lr=0.01, batch_size=48, weight_decay=5e-4, min_lr=0.0, ffn_num=64)
BENCHMARK_DEFAULTS = {
    "cifar100": CIFAR_RECIPE,
    "cub200": CIFAR_RECIPE,
    "imagenet-a": CIFAR_RECIPE,
    "domainnet": CIFAR_RECIPE,
    "imagenet-r": dict(CIFAR_RECIPE, lr=0.05, batch_size=24, weight_decay=5e-3),
    "digits": dict(CIFAR_RECIPE, ffn_num=8),
}


@dataclass
class AdapterConfig(PrototypeConfig):
    ffn_num: int = 64               # adapter bottleneck
    adapter_scale: float = 0.1      # ffn_adapter_scalar
    adapter_dropout: float = 0.1
    peft: str = "adapter"           # first-session tuner: "adapter" or "ssf"

    def __post_init__(self):
        getattr(super(), "__post_init__", lambda: None)()
        if self.peft not in ("adapter", "ssf"):
            raise UsageError(f"peft={self.peft!r}: choose 'adapter' or 'ssf'")
        if self.ffn_num < 1:
            raise UsageError(f"ffn_num={self.ffn_num}: the adapter bottleneck needs at least 1 unit")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise UsageError(f"adapter_dropout={self.adapter_dropout}: use a value in [0, 1)")


class FirstSessionTuning(PrototypeStrategy):
    """Adapters or SSF + cosine head tuned on the first task only (shared by APER and RanPAC)."""

    Config = AdapterConfig

    recipes = BENCHMARK_DEFAULTS
    fallback_recipe = CIFAR_RECIPE

    def prepare_model(self, model) -> None:
        model.backbone.requires_grad_(False)
        model.head = CosineHead(model.head.in_features)
        self.adapters, self.ssf = [], []
        if self.config.peft == "ssf":
            self.ssf = ssf.install(model.backbone)
        else:
            self.adapters = parallel_adapter.install(model.backbone)
            parallel_adapter.add_adapters(self.adapters, self.config.ffn_num,
                                          self.config.adapter_scale, self.config.adapter_dropout)

    def tuned_parameters(self):
        if self.ssf:
            return ssf.parameters(self.ssf)
        return parallel_adapter.adapter_parameters(self.adapters, 0)

    def epochs_for_task(self, task: int) -> int:
        return self.config.epochs if task == 0 else 0

    def trainable_parameters(self):
        if self.task > 0:
            return []
        return self.tuned_parameters() + list(self.model.head.parameters())

    def after_task(self, task: int) -> None:
        if task == 0:
            for p in self.tuned_parameters():
                p.requires_grad_(False)
        self.learn_without_gradients(task)

    def learn_without_gradients(self, task: int) -> None:
        raise NotImplementedError

    def restore_structure(self, state: dict) -> None:
        super().restore_structure(state)
        for p in self.tuned_parameters():
            p.requires_grad_(False)  # a checkpoint exists only after the first task

    def pretrained_features(self, images):
        context = ssf.disabled(self.ssf) if self.ssf else \
            parallel_adapter.using(self.adapters, None)
        with context:
            return self.model.features(images)

    def adapted_features(self, images):
        return self.model.features(images)  # the adapter (or SSF) is on outside pretrained_features
