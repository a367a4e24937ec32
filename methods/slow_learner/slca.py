"""SLCA (Zhang et al., "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a
Pre-trained Model", ICCV 2023; official code GengDavid/SLCA, ``models/slca.py``).

Every backbone weight trains at ``lr × backbone_lr_scale`` (0.01 × 0.01 = 1e-4) and the head at
``lr`` (0.01) under MultiStepLR; after each task the head is aligned on class Gaussians with the
older classes' means shrunk towards 0.9 and logits normalised per task (``base``).

Recipe, sources and deviations: docs/methods/slow_learner.md
"""
from __future__ import annotations

from clbench.methods.slow_learner.base import SlowLearner
from clbench.registry import register_method

# Official exps/slca/slca_{cifar,imgnetr,cub}.json (ViT-B/16 IN-21k); ImageNet-A and DomainNet
# have none: ImageNet-R's. ``ca_temperature`` is ``ca_with_logit_norm``.
_IMAGENET_R = dict(epochs=50, milestones=[40], ca_temperature=0.1)
BENCHMARK_DEFAULTS = {
    "cifar100": dict(epochs=20, milestones=[18], ca_temperature=0.1),
    "imagenet-r": _IMAGENET_R,
    "imagenet-a": _IMAGENET_R,
    "cub200": _IMAGENET_R,
    "domainnet": _IMAGENET_R,
    # Small, fast values for the embedded tiny benchmark (D = 96), not from the paper.
    "digits": dict(epochs=5, batch_size=32, milestones=[4]),
}


@register_method("slca", "SLCA: slow learner (whole backbone at 1/100 of the head's lr) + "
                         "classifier alignment on class Gaussians after each task, 1 forward pass")
class SLCA(SlowLearner):
    """Full sequential fine-tuning, slowed, with post-hoc head alignment; see ``base``."""

    recipes = BENCHMARK_DEFAULTS
