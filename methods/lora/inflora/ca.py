"""InfLoRA+CA: InfLoRA followed, after every task t ≥ 1, by SLCA-style classifier alignment
(official code liangyanshuo/InfLoRA, ``methods/inflora_ca.py`` and ``methods/inflora_ca1.py``):
the whole head is retrained on features sampled from Gaussians of every seen class (mean and
covariance of its training images' features under the test transform). Runs inside
``strategy.train()``, so it is timed.

Recipe, sources and deviations: docs/methods/lora.md
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.distributions import MultivariateNormal
from torch.nn import functional as F

from clbench.adapters import merged
from clbench.class_stats import StatisticsOptions
from clbench.distributed import all_reduce_sum
from clbench.errors import UsageError
from clbench.methods.lora.inflora.strategy import BENCHMARK_DEFAULTS, InfLoRA, InfLoRAConfig
from clbench.registry import register_method

# Official configs/mimg10_infloraca.json (InfLoRA_CA) and configs/cifar100_infloraca.json (_CA1).
_CA_IMAGENET_R = dict(epochs=50, lr=1e-3, batch_size=128, rank=10, lambda_b=0.95,
                      optimizer="sgd", schedule="annealing", memory="gpm")
CA_DEFAULTS = {
    "imagenet-r": _CA_IMAGENET_R,
    "imagenet-a": _CA_IMAGENET_R,
    "cub200": _CA_IMAGENET_R,
    "domainnet": _CA_IMAGENET_R,
    "cifar100": dict(epochs=20, lr=1e-3, head_lr=1e-2, weight_decay=1e-3, batch_size=128, rank=5,
                     lambda_b=0.95, optimizer="sgd", schedule="step", step_epoch=18,
                     memory="gpm"),
    "digits": BENCHMARK_DEFAULTS["digits"],
}


@dataclass
class InfLoRACAConfig(StatisticsOptions, InfLoRAConfig):
    lr_scaled_fields: ClassVar[tuple[str, ...]] = ("head_lr", "ca_lr")
    ca_epochs: int = 5
    ca_samples: int = 256            # sampled features per class and epoch (= CA batch size)
    ca_lr: float = 0.01
    ca_weight_decay: float = 5e-4
    ca_temperature: float = 0.1      # logit normalisation; 0 turns it off
    cov_ridge: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        if self.ca_epochs < 0 or self.ca_samples < 1:
            raise UsageError(f"inflora-ca needs ca_epochs >= 0 and ca_samples >= 1, got "
                             f"{self.ca_epochs} and {self.ca_samples}")
        if self.ca_lr <= 0 or self.ca_weight_decay < 0 or self.ca_temperature < 0 or self.cov_ridge <= 0:
            raise UsageError("inflora-ca needs ca_lr > 0, cov_ridge > 0, ca_weight_decay >= 0 "
                             "and ca_temperature >= 0 (0: no logit normalisation)")


@register_method("inflora-ca", "InfLoRA + classifier alignment (per-class Gaussian feature "
                               "replay retrains the head after each task), 1 forward pass")
class InfLoRACA(InfLoRA):
    Config = InfLoRACAConfig

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        return dict(CA_DEFAULTS.get(benchmark, {}))

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        dim = model.head.in_features
        self.class_means = torch.zeros(0, dim, dtype=torch.float64)
        self.class_covs = torch.zeros(0, dim, dim)
        self.class_task: list[int] = []

    def after_task(self, task: int) -> None:
        super().after_task(task)
        self.add_class_statistics(task)
        if task > 0:
            self.align_classifier(task)

    @torch.no_grad()
    def add_class_statistics(self, task: int) -> None:
        was_training = self.model.training
        self.model.eval()
        features, labels = [], []
        with merged(self.model):  # inference over the task's data
            for batch in self.statistics_loader(self.config.stats_transform):
                features.append(self.model.features(batch[0].to(self.device)).double())
                labels.append(batch[1].to(self.device))
        self.model.train(was_training)
        features, labels = torch.cat(features), torch.cat(labels)
        eye = torch.eye(features.shape[1], dtype=torch.float64, device=self.device)
        means, covs = [], []
        for c in range(self.known_classes, self.model.head.n_classes):
            # sufficient statistics summed over data-parallel ranks: every rank gets the same Gaussians
            x = features[labels == c]
            n = all_reduce_sum(torch.tensor(float(len(x)), dtype=torch.float64, device=self.device))
            mean = all_reduce_sum(x.sum(0)) / n
            scatter = all_reduce_sum(x.T @ x) - n * torch.outer(mean, mean)
            means.append(mean.cpu())
            covs.append((scatter / (n - 1).clamp_min(1) + self.config.cov_ridge * eye).float().cpu())
        self.class_means = torch.cat([self.class_means, torch.stack(means)])
        self.class_covs = torch.cat([self.class_covs, torch.stack(covs)])
        self.class_task += [task] * len(means)

    def gaussian(self, c: int, task: int) -> MultivariateNormal:
        shrink = 0.9 + (self.class_task[c] + 1) / (task + 1) * 0.1  # the official order of operations
        mean = (self.class_means[c] * shrink).float().to(self.device)
        cov = self.class_covs[c].to(self.device)
        eye = torch.eye(cov.shape[0], device=self.device)
        for _ in range(60):  # the official jitter loop, bounded (it cannot fix a NaN matrix)
            if torch.linalg.cholesky_ex(cov).info == 0:
                break
            cov = cov + self.config.cov_ridge * eye
        else:
            raise FloatingPointError(f"class {c}: covariance not positive definite after jitter")
        return MultivariateNormal(mean, cov)

    def align_classifier(self, task: int) -> None:
        cfg, head = self.config, self.model.head
        n_classes = head.n_classes
        optimizer = torch.optim.SGD(head.parameters(), lr=cfg.ca_lr, momentum=0.9,
                                    weight_decay=cfg.ca_weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.ca_epochs)
        bounds = [self.class_task.index(t) for t in range(task + 1)] + [n_classes]
        for _ in range(cfg.ca_epochs):
            with torch.no_grad():
                x = torch.cat([self.gaussian(c, task).sample((cfg.ca_samples,))
                               for c in range(n_classes)])
                y = torch.arange(n_classes, device=self.device).repeat_interleave(cfg.ca_samples)
                order = torch.randperm(len(y), device=self.device)
                x, y = x[order], y[order]
            for start in range(0, len(y), cfg.ca_samples):
                logits = head(x[start:start + cfg.ca_samples])
                if cfg.ca_temperature:
                    norms = torch.stack([logits[:, a:b].norm(dim=1) + 1e-7
                                         for a, b in zip(bounds, bounds[1:])], 1)
                    logits = logits / norms.mean(1, keepdim=True) / cfg.ca_temperature
                loss = F.cross_entropy(logits, y[start:start + cfg.ca_samples])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()

    def task_info(self) -> dict:
        return {**super().task_info(), "aligned_classes": self.model.head.n_classes
                if self.task > 0 else 0}

    def extra_state(self) -> dict:
        state = super().extra_state()
        state.update(class_means=self.class_means.clone(), class_covs=self.class_covs.clone(),
                     class_task=list(self.class_task))
        return state

    def restore_structure(self, state: dict) -> None:
        super().restore_structure(state)
        self.class_means = state["class_means"]
        self.class_covs = state["class_covs"]
        self.class_task = list(state["class_task"])
