"""The mechanisms of HiDe-Prompt (``hide_prompt``) that are not the strategy itself, each as the
official thu-ml/HiDe-Prompt code computes it: the task-identity head (``MlpMapping``), the
contrastive regulariser (``orth_loss``), Gaussian replay from stored class statistics and the TAP
refinement loop, the official ``EPrompt`` prefix layout, and the official timm schedulers stepped
with the finished epoch's index."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from timm.scheduler import create_scheduler
from torch import nn
from torch.nn import functional as F

from clbench.class_stats import ClassStatistics
from clbench.model import IncrementalHead
from clbench.precision import exact


def init_rows(head: IncrementalHead, start: int) -> None:
    """Rows [start, end) of a grown head: timm ViT init (trunc-normal std 0.02, zero bias)."""
    with torch.no_grad():
        rows = torch.empty_like(head.fc.weight[start:])
        nn.init.trunc_normal_(rows, std=0.02)
        head.fc.weight[start:] = rows
        head.fc.bias[start:] = 0.0


class TaskIdentityHead(nn.Module):
    """The official ``MlpMapping`` (hidden ×2) with residual and LayerNorm, then a class head."""

    def __init__(self, dim: int, hidden_mult: int = 2):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * hidden_mult)
        self.fc2 = nn.Linear(dim * hidden_mult, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = IncrementalHead(dim)
        for fc in (self.fc1, self.fc2):
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x + self.fc2(F.gelu(self.fc1(x)))))


def contrastive_regulariser(features: torch.Tensor, old_means: torch.Tensor,
                            temperature: float = 0.8) -> torch.Tensor:
    """CE(M Mᵀ / τ, I) with M = [old class means; batch features] (official ``orth_loss``)."""
    with exact(features.device):
        m = torch.cat([old_means.float().to(features.device), features.float()])
        similarity = m @ m.T / temperature
        return F.cross_entropy(similarity, torch.arange(len(m), device=m.device))


def gaussian_replay(stats: ClassStatistics, classes: range, per_class: int, generator,
                    jitter: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of N(mean_c, cov_c + jitter·I) for every class, float64 on the CPU,
    from the stored statistics only."""
    means, covs = stats.means(), stats.covariances()
    eye = torch.eye(stats.dim, dtype=torch.float64)
    samples, labels = [], []
    for c in classes:
        chol = torch.linalg.cholesky(covs[c] + jitter * eye)
        z = torch.randn(per_class, stats.dim, generator=generator, dtype=torch.float64)
        samples.append(means[c] + z @ chol.T)
        labels.append(torch.full((per_class,), c, dtype=torch.long))
    return torch.cat(samples), torch.cat(labels)


def refine_on_replay(module: nn.Module, stats: ClassStatistics, n_classes: int, n_batches: int,
                     per_class: int, epochs: int, lr: float, generator, device) -> None:
    """TAP: SGD (momentum 0.9) with cosine annealing over ``epochs``; each epoch draws
    ``per_class`` samples of every seen class, shuffles them and takes ``n_batches`` batches of
    ``per_class`` (the official loop)."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    with torch.enable_grad(), exact(device):
        for _ in range(epochs):
            x, y = gaussian_replay(stats, range(n_classes), per_class, generator)
            order = torch.randperm(len(y), generator=generator)
            x, y = x[order].float().to(device), y[order].to(device)
            for i in range(n_batches):
                batch = slice(i * per_class, (i + 1) * per_class)
                if batch.start >= len(y):
                    break
                loss = F.cross_entropy(module(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            schedule.step()


PROMPT_LAYOUTS = ("intended", "official")


def official_layout(prompts: torch.Tensor) -> torch.Tensor:
    """The prompts the official ``EPrompt.forward`` hands each image: ``prompts``
    (layers, B, 2L, D), image b's key rows then value rows, put in the official
    (layers, 2, B, L, D) order and *reshaped* (not permuted) to (layers, B, 2, L, D), returned as
    (layers, B, 2L, D)."""
    layers, b, rows, dim = prompts.shape
    official_order = prompts.reshape(layers, b, 2, rows // 2, dim).transpose(1, 2)
    return official_order.reshape(layers, b, rows, dim)


def official_scheduler(groups: list[dict], sched: str, epochs: int, min_lr: float,
                       decay_epochs: float):
    """The official stage's timm scheduler over the parameter groups ``groups`` (dicts of one
    optimizer, updated in place): ``create_scheduler(args, optimizer)`` with the arguments of
    configs/*_hideprompt_5e.py; ``None`` for ``constant``, for which the official code builds
    none."""
    if sched == "constant" or not groups or epochs < 1:
        return None
    args = SimpleNamespace(sched=sched, epochs=epochs, min_lr=min_lr,
                           decay_epochs=float(decay_epochs), decay_rate=0.1, warmup_lr=1e-6,
                           warmup_epochs=0, cooldown_epochs=10, patience_epochs=10, lr_noise=None,
                           lr_noise_pct=0.67, lr_noise_std=1.0)
    scheduler, _ = create_scheduler(args, SimpleNamespace(param_groups=groups))
    return scheduler


class EpochIndexedSchedules:
    """timm schedulers stepped as the official loops do: ``lr_scheduler.step(epoch)`` after epoch
    ``epoch`` (0-based), so epoch e trains at the scheduler's value for e−1."""

    def __init__(self, schedulers):
        self.schedulers = [s for s in schedulers if s is not None]
        self.epoch = 0

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step(self.epoch)
        self.epoch += 1
