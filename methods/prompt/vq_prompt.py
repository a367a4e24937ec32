"""VQ-Prompt (Jiao et al., "Vector Quantization Prompting for Continual Learning", NeurIPS 2024;
official code jiaolifengmi/VQ-Prompt, built on CODA-Prompt's: ``models/zoo.py`` ``VQPrompt``,
``learners/prompt.py``, ``trainer.py``, ``utils/schedulers.py``).

Per prompted block, a pool of N prompts P_n (length L) with keys K_n, shared by all tasks and all
trained in every task. For the frozen ViT's un-prompted CLS query q(x):

    α = softmax(q · normalize(K)ᵀ / τ)      (q itself is not normalised)
    p = Σ_n α_n P_n,   n* = argmin_n ‖p − P_n‖²,   P = p + sg(P_n* − p)   (straight-through)

P's first L/2 rows are the block's key prefix and the last L/2 its value prefix; the VQ terms
0.4·‖p − sg(P_n*)‖² + 0.1·‖P_n* − sg(p)‖² (means) of every block join the current-task
cross-entropy. AdamW with the prompts at 5× the head's rate under a per-iteration cosine whose
first iterations run at 1e-6. After every task the classes' feature means and variances
(prompted CLS features) are stored, and from the second task on the head is refined on samples of
N(mean, diag(var) + 1e-4·I) of every seen class (the official "adaptive prediction").

Recipe, sources and deviations: docs/methods/prompt.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from avalanche.core import SupervisedPlugin
from torch import nn
from torch.distributions import MultivariateNormal
from torch.nn import functional as F

from clbench.class_stats import StatisticsOptions
from clbench.distributed import all_reduce_sum
from clbench.errors import UsageError
from clbench.methods.prompt import (PromptConfig, PromptStrategy, prompted_tokens,
                                    query_features, split_prefix)
from clbench.precision import exact
from clbench.registry import register_method
from clbench.schedules import cosine_per_epoch


class VQPool(nn.Module):
    """Keys (layers, N, D) and prompts (layers, N, L, D), uniform in [0, 1) (``tensor_prompt``)."""

    def __init__(self, n_layers: int, size: int, length: int, dim: int):
        super().__init__()
        self.keys = nn.Parameter(torch.rand(n_layers, size, dim))
        self.prompts = nn.Parameter(torch.rand(n_layers, size, length, dim))


def quantize(query: torch.Tensor, keys: torch.Tensor, prompts: torch.Tensor, temperature: float):
    """(straight-through prompt (B, L, D), soft prompt p, nearest prompt P_n*, n* (B,))."""
    with exact(query.device):
        alpha = torch.softmax(query.float() @ F.normalize(keys.float(), dim=1).T / temperature, 1)
        soft = torch.einsum("bn,nld->bld", alpha, prompts.float())
        distance = (soft.unsqueeze(1) - prompts.float()).pow(2).sum(dim=(-1, -2))
        index = distance.argmin(dim=1)
        nearest = prompts.float().index_select(0, index)
        return soft + (nearest - soft).detach(), soft, nearest, index


def vq_loss(soft: torch.Tensor, nearest: torch.Tensor, vq_weight: float,
            commit_weight: float) -> torch.Tensor:
    """vq_weight·mse(p, sg(P_n*)) + commit_weight·mse(P_n*, sg(p)) (official coefficients and
    names: ``vq_coef`` on the term that moves p, ``comit_coef`` on the one that moves the pool)."""
    return (vq_weight * F.mse_loss(soft, nearest.detach())
            + commit_weight * F.mse_loss(nearest, soft.detach()))


class IterationCosine:
    """The official ``CosineSchedulerIter``: per parameter group, ``freeze`` iterations at 1e-6,
    ``warmup`` iterations rising linearly from 0, then a cosine from the base rate to ``final``
    over the rest of ``total`` iterations; the final rate after that. ``apply()`` sets the rate of
    the next optimiser step."""

    def __init__(self, optimizer, bases, finals, total: int, freeze: int = 0, warmup: int = 0):
        self.optimizer, self.iteration = optimizer, 0
        self.finals, self.rates = list(finals), []
        cosine = max(total - freeze - warmup, 0)
        for base, final in zip(bases, finals):
            rise = [base * i / (warmup - 1) for i in range(warmup)] if warmup > 1 else [0.0] * warmup
            curve = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / cosine))
                     for i in range(cosine)]
            self.rates.append([1e-6] * freeze + rise + curve)

    def rate(self, group: int, iteration: int) -> float:
        rates = self.rates[group]
        return rates[iteration] if iteration < len(rates) else self.finals[group]

    def apply(self) -> None:
        for g, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.rate(g, self.iteration)
        self.iteration += 1

    def step(self) -> None:  # the per-epoch call of the core: nothing to do
        pass


class _PerStepSchedule(SupervisedPlugin):
    """Sets the per-iteration rate before every optimiser step (the official loop steps its
    scheduler after every update, which its constructor has already set for the first one)."""

    def before_update(self, strategy, **kwargs):
        if isinstance(strategy.scheduler, IterationCosine):
            strategy.scheduler.apply()


class ClassMoments:
    """Per class: count, Σx and Σx² (float64, diagonal only) of the prompted features."""

    def __init__(self, dim: int):
        self.count = torch.zeros(0, dtype=torch.float64)
        self.sum = torch.zeros(0, dim, dtype=torch.float64)
        self.squares = torch.zeros(0, dim, dtype=torch.float64)

    def add(self, features: torch.Tensor, labels: torch.Tensor, classes: range) -> None:
        for c in classes:
            x = features[labels == c].double()
            n = all_reduce_sum(torch.tensor([float(len(x))], dtype=torch.float64, device=x.device))
            self.count = torch.cat([self.count, n.cpu()])
            self.sum = torch.cat([self.sum, all_reduce_sum(x.sum(0)).cpu()[None]])
            self.squares = torch.cat([self.squares, all_reduce_sum((x * x).sum(0)).cpu()[None]])

    def mean_and_variance(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and the population variance (``np.var``) of class ``c``."""
        n = self.count[c].clamp_min(1)
        mean = self.sum[c] / n
        return mean, (self.squares[c] / n - mean * mean).clamp_min(0)

    def state_dict(self) -> dict:
        return {"count": self.count.clone(), "sum": self.sum.clone(), "squares": self.squares.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.sum, self.squares = state["count"], state["sum"], state["squares"]


def refine_head(head: nn.Module, moments: ClassMoments, n_classes: int, n_old: int, per_class: int,
                epochs: int, lr: float, weight_decay: float, final_lr: float, ridge: float,
                device) -> None:
    """The official ``train_task_adaptive_prediction``: AdamW at ``lr``/10 under a per-iteration
    cosine to ``final_lr``; each epoch draws ``per_class`` samples of every seen class with a
    non-zero variance, shuffles them (CPU permutation) and takes ``n_old`` batches of
    ``per_class``."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr / 10, weight_decay=weight_decay)
    schedule = IterationCosine(optimizer, [lr / 10], [final_lr], total=n_old * epochs)
    with torch.enable_grad(), exact(device):
        for _ in range(epochs):
            samples, labels = [], []
            for c in range(n_classes):
                mean, var = moments.mean_and_variance(c)
                if float(var.mean()) == 0:
                    continue
                cov = torch.diag(var) + ridge * torch.eye(len(var), dtype=var.dtype)
                gaussian = MultivariateNormal(mean.float().to(device), cov.float().to(device))
                samples.append(gaussian.sample((per_class,)))
                labels += [c] * per_class
            x, y = torch.cat(samples), torch.tensor(labels, device=device)
            order = torch.randperm(len(y))
            x, y = x[order.to(device)], y[order.to(device)]
            for i in range(n_old):
                batch = slice(i * per_class, (i + 1) * per_class)
                loss = F.cross_entropy(head(x[batch])[:, :n_classes], y[batch])
                schedule.apply()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()


@dataclass
class VQPromptConfig(StatisticsOptions, PromptConfig):
    schedules: ClassVar[tuple[str, ...]] = ("coswm", "cosine", "constant")
    lr_scaled_fields: ClassVar[tuple[str, ...]] = ("ca_lr", "final_lr")
    # configs/imnet-r_prompt_vq.yaml and experiments/imagenet-r_all.sh (10 tasks)
    epochs: int = 20
    lr: float = 0.0025                # the head's; prompts and keys at lr × prompt_lr_scale
    batch_size: int = 64
    prompt_lr_scale: float = 5.0
    weight_decay: float = 0.0
    schedule: str = "coswm"           # per-iteration cosine (``coswm``), or the CODA per-epoch one
    freeze_epochs: float = 1.0        # official schedule[0] iterations at 1e-6, in epochs
    warmup_epochs: float = 0.0
    iter_step: int = 0                # iterations per epoch of the schedule; 0: the loader's
    final_lr: float = 1e-6
    pool_size: int = 10
    prompt_length: int = 8
    temperature: float = 1.0
    prompt_blocks: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    vq_weight: float = 0.4
    commit_weight: float = 0.1
    ca_epochs: int = 10               # --crct_epochs
    ca_lr: float = 1e-4               # --ca_lr (the refinement runs at ca_lr / 10)
    ca_weight_decay: float = 5e-4
    ca_samples_ratio: float = 4.0     # samples per class = batch_size × this
    cov_ridge: float = 1e-4
    stats_transform: str = "train"    # official: the augmented training set

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_length % 2 or self.prompt_length < 2 or self.pool_size < 1:
            raise UsageError("vq-prompt: prompt_length must be even (key/value halves) and "
                             "pool_size >= 1")
        if self.temperature <= 0 or self.prompt_lr_scale <= 0 or self.ca_samples_ratio <= 0:
            raise UsageError("vq-prompt: temperature, prompt_lr_scale and ca_samples_ratio must "
                             "be > 0")
        if min(self.freeze_epochs, self.warmup_epochs, self.iter_step, self.ca_epochs,
               self.weight_decay, self.ca_weight_decay, self.vq_weight, self.commit_weight) < 0:
            raise UsageError("vq-prompt: epochs, iterations, weights and decays must be >= 0")
        if self.ca_lr <= 0 or self.final_lr < 0 or self.cov_ridge <= 0:
            raise UsageError("vq-prompt: ca_lr > 0, final_lr >= 0 and cov_ridge > 0")


# Official configs/*_vq.yaml with experiments/*.sh (prompt_param "10 8 τ"); ImageNet-A and
# DomainNet have none: ImageNet-R's. freeze_epochs = schedule[0] / iter_step.
BENCHMARK_DEFAULTS = {
    "cifar100": dict(batch_size=128, freeze_epochs=2.0),
    "cub200": dict(batch_size=128, schedule="cosine", temperature=5.0, ca_samples_ratio=2.0),
    # Small, fast values for the embedded tiny benchmark (D = 96), not from the paper: with 2-8
    # refinement batches per epoch (ImageNet-R: up to 180) the refinement needs a larger rate.
    "digits": dict(epochs=5, batch_size=32, freeze_epochs=0.0, ca_lr=0.01),
}


@register_method("vq-prompt", "VQ-Prompt: query-weighted prompt composition quantised to the "
                              "nearest of a 10-prompt pool (straight-through), prefix tuning in "
                              "blocks 0-4, head refined on class Gaussians (official code)")
class VQPrompt(PromptStrategy):
    """Vector-quantised composed prompts; see the module docstring."""

    Config = VQPromptConfig

    def __init__(self, *, plugins=None, **kwargs):
        super().__init__(plugins=[*(plugins or []), _PerStepSchedule()], **kwargs)

    recipes = BENCHMARK_DEFAULTS

    @classmethod
    def validate(cls, config, context) -> None:
        cls.resolve_blocks(config, context.backbone_depth)

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        c, vit = self.config, model.backbone
        self.prompt_blocks = self.checked_prompt_blocks(vit)
        model.add_state("prompt", VQPool(len(self.prompt_blocks), c.pool_size, c.prompt_length,
                                         vit.embed_dim))
        self.moments = ClassMoments(vit.embed_dim)
        self._vq = 0.0

    # ------------------------------------------------------------------ forward
    def prompted_features(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """CLS of the pass prompted by the quantised prompts of ``query``; sets the VQ loss."""
        pool, c, prefixes, vq = self.model.prompt, self.config, {}, 0.0
        for layer, block in enumerate(self.prompt_blocks):
            prompt, soft, nearest, _ = quantize(query, pool.keys[layer], pool.prompts[layer],
                                                c.temperature)
            prefixes[block] = split_prefix(prompt)
            if self.is_training:
                vq = vq + vq_loss(soft, nearest, c.vq_weight, c.commit_weight)
        self._vq = vq
        tokens = prompted_tokens(self.model.backbone, self.model.normalize(x), prefixes=prefixes)
        return tokens[:, 0]

    def forward(self):
        return self.model.head(self.prompted_features(self.mb_x, self.query()))

    def extra_loss(self):
        return self._vq

    # ------------------------------------------------------------------ optimisation
    @torch.no_grad()
    def before_task(self, task: int) -> None:
        """New head rows as a default ``nn.Linear`` (the official ``last`` layer)."""
        fc, known = self.model.head.fc, self.known_classes
        fresh = nn.Linear(fc.in_features, fc.out_features - known)
        fc.weight[known:] = fresh.weight.to(fc.weight)
        fc.bias[known:] = fresh.bias.to(fc.bias)

    def make_optimizer_for_task(self, params):
        c, model = self.config, self.model
        groups = [{"params": list(model.prompt.parameters()), "lr": c.lr * c.prompt_lr_scale,
                   "weight_decay": c.weight_decay},
                  {"params": list(model.head.parameters()), "lr": c.lr,
                   "weight_decay": c.weight_decay}]
        return torch.optim.AdamW(groups, lr=c.lr)

    def make_scheduler_for_task(self, optimizer):
        c = self.config
        if c.schedule == "constant":
            return None
        if c.schedule == "cosine":
            return cosine_per_epoch(optimizer, c.epochs)
        per_epoch = c.iter_step or len(self.dataloader)
        bases = [group["lr"] for group in optimizer.param_groups]
        return IterationCosine(optimizer, bases, [c.final_lr] * len(bases), per_epoch * c.epochs,
                               freeze=round(c.freeze_epochs * per_epoch),
                               warmup=round(c.warmup_epochs * per_epoch))

    # ------------------------------------------------------------------ after a task
    def after_task(self, task: int) -> None:
        c, model = self.config, self.model
        was_training = model.training
        model.eval()
        features, labels = [], []
        with torch.no_grad():
            for batch in self.statistics_loader(c.stats_transform):
                x = batch[0].to(self.device)
                features.append(self.prompted_features(
                    x, query_features(model.backbone, model.normalize(x))).float())
                labels.append(batch[1].to(self.device))
        model.train(was_training)
        self.moments.add(torch.cat(features), torch.cat(labels),
                         range(self.known_classes, model.head.n_classes))
        if task > 0 and c.ca_epochs > 0:
            refine_head(model.head, self.moments, model.head.n_classes, self.known_classes,
                        int(c.batch_size * c.ca_samples_ratio), c.ca_epochs, c.ca_lr,
                        c.ca_weight_decay, c.final_lr, c.cov_ridge, self.device)

    # ------------------------------------------------------------------ bookkeeping
    def extra_state(self) -> dict:
        return {**super().extra_state(), "prompt_blocks": list(self.prompt_blocks),
                "moments": self.moments.state_dict()}

    def restore_structure(self, state: dict) -> None:
        if state.get("prompt_blocks") != list(self.prompt_blocks):
            raise RuntimeError("checkpoint was made with other VQ-Prompt blocks")
        super().restore_structure(state)
        self.moments.load_state_dict(state["moments"])

    def task_info(self) -> dict:
        c = self.config
        return {"prompt_blocks": list(self.prompt_blocks),
                "requested_prompt_blocks": list(c.prompt_blocks), "pool_size": c.pool_size,
                "refined_classes": self.model.head.n_classes if self.task > 0 and c.ca_epochs
                else 0}
