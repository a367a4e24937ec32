"""Classifier alignment from class Gaussians (SLCA, Zhang et al., ICCV 2023; official code
GengDavid/SLCA, ``_compute_class_mean`` and ``_stage2_compact_classifier``).

After a task the backbone has drifted and the head's old rows no longer match it, while the old
images are gone. Alignment keeps, per class, the mean and covariance of its training images'
features (under the test transform, like every official code), samples features from those
Gaussians for every seen class and retrains the head on them. InfLoRA-CA, SLCA, SLCA++, MOS and
TUNA share this stage; each passes its official options (:class:`AlignmentOptions`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import MultivariateNormal
from torch.nn import functional as F

from clbench.adapters import merged
from clbench.distributed import all_reduce_sum
from clbench.errors import UsageError


@dataclass
class AlignmentOptions:
    """Config mixin of the methods that align their classifier (defaults: InfLoRA-CA's official
    values; each method's recipe sets its own). ``ca_samples`` features per class and epoch, which is also the batch size;
    ``ca_temperature`` divides logits normalised by their per-task norms (0: no normalisation);
    ``cov_ridge`` is added to every covariance and is the jitter step when one is not positive
    definite."""

    ca_epochs: int = 5
    ca_samples: int = 256
    ca_lr: float = 0.01
    ca_weight_decay: float = 5e-4
    ca_temperature: float = 0.1
    cov_ridge: float = 1e-4

    def __post_init__(self):
        getattr(super(), "__post_init__", lambda: None)()
        if self.ca_epochs < 0 or self.ca_samples < 1:
            raise UsageError(f"classifier alignment needs ca_epochs >= 0 and ca_samples >= 1, "
                             f"got {self.ca_epochs} and {self.ca_samples}")
        if (self.ca_lr <= 0 or self.ca_weight_decay < 0 or self.ca_temperature < 0
                or self.cov_ridge <= 0):
            raise UsageError("classifier alignment needs ca_lr > 0, cov_ridge > 0, "
                             "ca_weight_decay >= 0 and ca_temperature >= 0 (0: no logit "
                             "normalisation)")


class ClassGaussians:
    """Per class: the feature mean (float64), the covariance (float32, unbiased, plus the
    ridge) and the task the class arrived in. Sums are reduced over data-parallel ranks, so
    every rank holds the same Gaussians."""

    def __init__(self, dim: int, ridge: float):
        self.ridge = ridge
        self.means = torch.zeros(0, dim, dtype=torch.float64)
        self.covs = torch.zeros(0, dim, dim)
        self.class_task: list[int] = []

    def __len__(self) -> int:
        return len(self.class_task)

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor, classes: range,
            task: int) -> None:
        """Append ``classes`` from this rank's float64 ``features`` of one task's images."""
        eye = torch.eye(features.shape[1], dtype=torch.float64, device=features.device)
        means, covs = [], []
        for c in classes:
            x = features[labels == c]
            n = all_reduce_sum(torch.tensor(float(len(x)), dtype=torch.float64,
                                            device=features.device))
            mean = all_reduce_sum(x.sum(0)) / n
            scatter = all_reduce_sum(x.T @ x) - n * torch.outer(mean, mean)
            means.append(mean.cpu())
            covs.append((scatter / (n - 1).clamp_min(1) + self.ridge * eye).float().cpu())
        self.means = torch.cat([self.means, torch.stack(means)])
        self.covs = torch.cat([self.covs, torch.stack(covs)])
        self.class_task += [task] * len(means)

    def mean_scale(self, c: int, task: int) -> float:
        """The factor on class ``c``'s mean at ``task``: SLCA shrinks older classes' means
        towards 0.9 of their value (a subclass may sample other means, e.g. unshrunk)."""
        return 0.9 + (self.class_task[c] + 1) / (task + 1) * 0.1

    def gaussian(self, c: int, task: int, device) -> MultivariateNormal:
        """Class ``c``'s sampling distribution at ``task`` (mean times ``mean_scale``, in the
        official order of operations)."""
        mean = (self.means[c] * self.mean_scale(c, task)).float().to(device)
        cov = self.covs[c].to(device)
        eye = torch.eye(cov.shape[0], device=device)
        for _ in range(60):  # the official jitter loop, bounded (it cannot fix a NaN matrix)
            if torch.linalg.cholesky_ex(cov).info == 0:
                break
            cov = cov + self.ridge * eye
        else:
            raise FloatingPointError(f"class {c}: covariance not positive definite after jitter")
        return MultivariateNormal(mean, cov)

    def state_dict(self) -> dict:
        return {"class_means": self.means.clone(), "class_covs": self.covs.clone(),
                "class_task": list(self.class_task)}

    def load_state_dict(self, state: dict) -> None:
        self.means, self.covs = state["class_means"], state["class_covs"]
        self.class_task = list(state["class_task"])


class GaussianStatistics:
    """Strategy mixin: ``add_class_statistics(task)`` appends the task's new classes to
    ``self.gaussians`` from the statistics pass (test transform by default) through the model
    in inference form (merged adapters, eval mode)."""

    @torch.no_grad()
    def add_class_statistics(self, task: int) -> None:
        was_training = self.model.training
        self.model.eval()
        features, labels = [], []
        with merged(self.model):
            for batch in self.statistics_loader(self.config.stats_transform):
                features.append(self.model.features(batch[0].to(self.device)).double())
                labels.append(batch[1].to(self.device))
        self.model.train(was_training)
        self.gaussians.add(torch.cat(features), torch.cat(labels),
                           range(self.known_classes, self.model.head.n_classes), task)


def align_classifier(head: nn.Module, gaussians: ClassGaussians, task: int,
                     options: AlignmentOptions, device, t_max: int | None = None) -> None:
    """Retrain ``head`` (every parameter, nothing else) on features sampled from every seen
    class's Gaussian: per epoch ``ca_samples`` per class, one shuffle, batches of
    ``ca_samples``; SGD (momentum 0.9) under CosineAnnealingLR with ``T_max`` = the alignment
    epochs (or ``t_max``, as TUNA's code fixes it)."""
    n_classes = len(gaussians)
    optimizer = torch.optim.SGD(head.parameters(), lr=options.ca_lr, momentum=0.9,
                                weight_decay=options.ca_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=options.ca_epochs if t_max is None else t_max)
    bounds = [gaussians.class_task.index(t) for t in range(task + 1)] + [n_classes]
    size = options.ca_samples
    for _ in range(options.ca_epochs):
        with torch.no_grad():
            x = torch.cat([gaussians.gaussian(c, task, device).sample((size,))
                           for c in range(n_classes)])
            y = torch.arange(n_classes, device=device).repeat_interleave(size)
            order = torch.randperm(len(y), device=device)
            x, y = x[order], y[order]
        for start in range(0, len(y), size):
            logits = head(x[start:start + size])
            if options.ca_temperature:
                norms = torch.stack([logits[:, a:b].norm(dim=1) + 1e-7
                                     for a, b in zip(bounds, bounds[1:])], 1)
                logits = logits / norms.mean(1, keepdim=True) / options.ca_temperature
            loss = F.cross_entropy(logits, y[start:start + size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
