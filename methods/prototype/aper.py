"""APER with adapters (a.k.a. ADAM; Zhou et al., IJCV 2024; official code
zhoudw-zdw/RevisitingCIL ``models/aper_adapter.py`` + ``utils/inc_net.py``
``MultiBranchCosineIncrementalNet``; LAMDA-PILOT ``models/aper_adapter.py``), or with SSF
(``peft="ssf"``: ``models/aper_ssf.py``, mechanism in ``methods/prototype/ssf.py``).

1. First task only: AdaptFormer-style parallel adapters (``clbench.methods.prototype.parallel_adapter``:
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

import torch

from clbench.class_stats import ClassStatistics
from clbench.methods.prototype.base import ClassMeanPrototypes
from clbench.methods.prototype.first_session import CIFAR_RECIPE, BENCHMARK_DEFAULTS, FirstSessionTuning
from clbench.registry import register_method


@register_method("aper", "APER/ADAM (adapter): adapters tuned on the first task, then cosine to "
                         "prototypes of [pretrained, adapted] features, 2 forward passes")
class APER(ClassMeanPrototypes, FirstSessionTuning):
    forward_passes_per_image = 2
    variant_keys = ("peft",)  # SSF has its own per-benchmark settings

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int, peft: str = "adapter") -> dict:
        if peft == "ssf":
            bottleneck = BENCHMARK_DEFAULTS.get(benchmark, CIFAR_RECIPE)["ffn_num"]
            return dict(CIFAR_RECIPE, peft="ssf", ffn_num=bottleneck)
        return dict(BENCHMARK_DEFAULTS.get(benchmark, CIFAR_RECIPE))

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
