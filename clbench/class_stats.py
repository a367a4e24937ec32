"""Per-class feature statistics as float64 sums: counts, Σx and Σxxᵀ.

Several methods keep class statistics instead of images (InfLoRA-CA and HiDe-Prompt sample class
Gaussians, SimpleCIL/APER/EASE keep prototypes, RanPAC a Gram matrix). Keeping *sums* makes the
result independent of batch order, exact under data parallelism (sum over ranks, then divide)
and cheap to checkpoint. Everything is float64 and computed outside autocast.

The images come from ``CLStrategy.statistics_loader``: by default the task's training images
under the *test* transform, in a separate pass, as every official code computes them
(RevisitingCIL/PILOT's ``mode="test"`` loaders, RanPAC's ``train_loader_for_CPs``, HiDe-Prompt's
``dataset_train_mean``, InfLoRA's CA); the augmented training loader is kept as the
``stats_transform="train"`` ablation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clbench.distributed import all_reduce_sum
from clbench.errors import UsageError
from clbench.precision import exact

STATS_TRANSFORMS = ("test", "train")


@dataclass
class StatisticsOptions:
    """Config mixin of the methods that keep class statistics. ``stats_transform``: ``"test"``
    (the official protocol: training images under the test transform) or ``"train"`` (the
    augmented training loader, as this harness did before; an ablation, not a recipe)."""

    stats_transform: str = "test"

    def __post_init__(self):
        getattr(super(), "__post_init__", lambda: None)()
        if self.stats_transform not in STATS_TRANSFORMS:
            raise UsageError(f"stats_transform={self.stats_transform!r}: choose 'test' (training "
                             "images under the test transform, the official protocol) or 'train' "
                             "(the augmented training loader, an ablation)")


class ClassStatistics:
    """Running sums per class id; ``second_moments=False`` keeps only counts and sums."""

    def __init__(self, dim: int, second_moments: bool = True):
        self.dim = dim
        self.second_moments = second_moments
        self.count = torch.zeros(0, dtype=torch.float64)
        self.sum = torch.zeros(0, dim, dtype=torch.float64)
        self.outer = torch.zeros(0, dim, dim, dtype=torch.float64) if second_moments else None

    @property
    def n_classes(self) -> int:
        return len(self.count)

    def _grow(self, n_classes: int) -> None:
        extra = n_classes - self.n_classes
        if extra <= 0:
            return
        self.count = torch.cat([self.count, self.count.new_zeros(extra)])
        self.sum = torch.cat([self.sum, self.sum.new_zeros(extra, self.dim)])
        if self.outer is not None:
            self.outer = torch.cat([self.outer, self.outer.new_zeros(extra, self.dim, self.dim)])

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch (this rank's part only; call ``reduce`` once all batches are in)."""
        features = features.detach().to("cpu", torch.float64)
        labels = labels.detach().to("cpu", torch.long)
        self._grow(int(labels.max()) + 1 if len(labels) else 0)
        self.count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self.sum.index_add_(0, labels, features)
        if self.outer is not None:  # one d×d product per class present (not per sample)
            for c in labels.unique().tolist():
                x = features[labels == c]
                self.outer[c] += x.T @ x

    def reduce(self, classes: range) -> None:
        """Sum the given classes' statistics over data-parallel ranks (no-op on one process)."""
        self._grow(classes.stop)
        index = torch.tensor(list(classes), dtype=torch.long)
        for name in ("count", "sum", "outer"):
            tensor = getattr(self, name)
            if tensor is not None:
                tensor[index] = all_reduce_sum(tensor[index].clone())

    def means(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1)[:, None]

    def covariances(self) -> torch.Tensor:
        """Unbiased per-class covariance (n − 1 in the denominator)."""
        if self.outer is None:
            raise RuntimeError("covariances need second_moments=True")
        mean = self.means()
        n = self.count[:, None, None]
        scatter = self.outer - n * mean[:, :, None] * mean[:, None, :]
        return scatter / (n - 1).clamp_min(1)

    def state_dict(self) -> dict:
        state = {"count": self.count.clone(), "sum": self.sum.clone()}
        if self.outer is not None:
            state["outer"] = self.outer.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.count, self.sum = state["count"].double(), state["sum"].double()
        self.outer = state["outer"].double() if "outer" in state else None
        self.second_moments = self.outer is not None


@torch.no_grad()
def collect(statistics: ClassStatistics, features_of, loader, device, classes: range) -> None:
    """Run ``features_of(images)`` over a loader (inference mode, full precision) into
    ``statistics``, then reduce ``classes`` over ranks."""
    for batch in loader:
        images, labels = batch[0].to(device, non_blocking=True), batch[1]
        with exact(device):
            statistics.update(features_of(images).float(), labels)
    statistics.reduce(classes)
