"""APER with adapters (a.k.a. ADAM; Zhou et al., IJCV 2024; official code
zhoudw-zdw/RevisitingCIL ``models/aper_adapter.py`` + ``utils/inc_net.py``
``MultiBranchCosineIncrementalNet``; LAMDA-PILOT ``models/aper_adapter.py``), or with SSF
(``peft="ssf"``: ``models/aper_ssf.py``, mechanism in ``methods/aper_ssf.py``).

1. First task only: AdaptFormer-style parallel adapters (``clbench.parallel_adapter``:
   bottleneck 64 on ViT-B, scale 0.1, dropout 0.1, "lora" init) in every block (or SSF scales
   and shifts) are tuned together with a cosine classifier (σ·cos, σ learnable) by
   cross-entropy over the first task's classes; SGD momentum 0.9, ``weight_decay``, CosineAnnealingLR(T_max=epochs, eta_min=min_lr).
2. Afterwards nothing trains. The feature of an image is the concatenation
   [pretrained backbone(x), adapted backbone(x)] (two forward passes); the prototype of each class
   is the mean of that 2d-dimensional feature over its training images, and prediction is the
   cosine to the prototypes (SimpleCIL on the concatenated feature).

Per-benchmark settings (RevisitingCIL ``exps/aper_adapter/*.json``): ImageNet-R: 20 epochs,
lr 0.05, batch 24, wd 0.005; CIFAR-100, CUB-200, ImageNet-A: 20 epochs, lr 0.01, batch 48,
wd 5e-4; min_lr 0 and ffn_num 64 everywhere. DomainNet has no official config: the CIFAR values.
SSF (``exps/aper_ssf/*.json``): 20 epochs, lr 0.01, batch 48, wd 5e-4 on every benchmark.
``digits`` (tiny backbone, width 96): bottleneck 8 (the same 1/12 of the width as 64/768),
otherwise the official CIFAR recipe.

Deviations from the official code:
* none in the statistics: prototypes use the training images under the test transform, as the
  official code (``stats_transform="train"``: the augmented training loader, an ablation);
* the adapter is added by wrapping timm's ``block.mlp`` (same maths: it reads the un-normalised
  post-attention stream and is added to the MLP output), not a forked ViT;
* the backbone is the run's (official configs: ``vit_base_patch16_224_in21k``);
* the VPT and finetune variants of APER are not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clbench import parallel_adapter
from clbench.class_stats import ClassStatistics
from clbench.errors import UsageError
from clbench.methods import aper_ssf
from clbench.methods.simplecil import (ClassMeanPrototypes, CosineHead, PrototypeConfig,
                                      PrototypeStrategy)
from clbench.registry import register_method

_CIFAR = dict(epochs=20, lr=0.01, batch_size=48, weight_decay=5e-4, min_lr=0.0, ffn_num=64)
BENCHMARK_DEFAULTS = {
    "cifar100": _CIFAR,
    "cub200": _CIFAR,
    "imagenet-a": _CIFAR,
    "domainnet": _CIFAR,
    "imagenet-r": dict(_CIFAR, lr=0.05, batch_size=24, weight_decay=5e-3),
    "digits": dict(_CIFAR, ffn_num=8),
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

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        return dict(BENCHMARK_DEFAULTS.get(benchmark, _CIFAR))

    def prepare_model(self, model) -> None:
        model.backbone.requires_grad_(False)
        model.head = CosineHead(model.head.in_features)
        self.adapters, self.ssf = [], []
        if self.config.peft == "ssf":
            self.ssf = aper_ssf.install(model.backbone)
        else:
            self.adapters = parallel_adapter.install(model.backbone)
            parallel_adapter.add_adapters(self.adapters, self.config.ffn_num,
                                          self.config.adapter_scale, self.config.adapter_dropout)

    def tuned_parameters(self):
        if self.ssf:
            return aper_ssf.parameters(self.ssf)
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
        context = aper_ssf.disabled(self.ssf) if self.ssf else \
            parallel_adapter.using(self.adapters, None)
        with context:
            return self.model.features(images)

    def adapted_features(self, images):
        return self.model.features(images)  # the adapter (or SSF) is on outside pretrained_features


@register_method("aper", "APER/ADAM (adapter): adapters tuned on the first task, then cosine to "
                         "prototypes of [pretrained, adapted] features, 2 forward passes")
class APER(ClassMeanPrototypes, FirstSessionTuning):
    forward_passes_per_image = 2
    variant_keys = ("peft",)  # SSF has its own per-benchmark settings

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int, peft: str = "adapter") -> dict:
        if peft == "ssf":
            bottleneck = BENCHMARK_DEFAULTS.get(benchmark, _CIFAR)["ffn_num"]
            return dict(_CIFAR, peft="ssf", ffn_num=bottleneck)
        return dict(BENCHMARK_DEFAULTS.get(benchmark, _CIFAR))

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        self.statistics = ClassStatistics(2 * model.head.in_features, second_moments=False)

    def features(self, images):
        """[pretrained(x), adapted(x)]: the official MultiBranchCosineIncrementalNet order."""
        return torch.cat([self.pretrained_features(images), self.adapted_features(images)], dim=1)

    features_for_prototypes = features

    def learn_without_gradients(self, task: int) -> None:
        self.update_prototypes()

    def task_info(self) -> dict:
        return {"first_session_tuned": self.task == 0}
