"""The two-pass prompt strategy shared by L2P, L2P++, CODA-Prompt, DualPrompt and HiDe-Prompt.

Every prompt method runs the frozen pretrained ViT twice per image: an un-prompted pass whose CLS
feature is the *query* (it selects, weights or identifies the prompts) and the prompted pass that
feeds the head. What they share as training recipe lives here: the query pass (optionally cached
per training image), Adam, the official per-epoch cosine or a constant rate, optional gradient
clipping. A method adds its prompt parameters in ``prepare_model`` and its ``forward``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.utils.data import Dataset

from clbench.errors import UsageError
from clbench.hparams import TrainConfig
from clbench.methods.prompt import injection
from clbench.schedules import cosine_per_epoch
from clbench.strategy import CLStrategy


@dataclass
class PromptConfig(TrainConfig):
    schedules: ClassVar[tuple[str, ...]] = ("cosine", "constant")
    schedule: str = "cosine"  # "cosine" (CODA/InfLoRA per-epoch formula) or "constant"
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    # Reuse each training image's query feature after its first epoch. Exact only when the
    # training transform is deterministic (true for `digits`; false with random crops/flips,
    # where the official codes recompute the query for every augmented view).
    cache_queries: bool = False

    def __post_init__(self):
        if self.schedule not in self.schedules:
            raise UsageError(f"schedule must be one of {', '.join(self.schedules)}, "
                             f"got {self.schedule!r}")
        if self.grad_clip < 0:
            raise UsageError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


class IndexedItems(Dataset):
    """A dataset view whose items carry their position: (x, y, index, task label)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, y, *rest = self.dataset[index]
        return (x, y, index, *rest)


class QueryCache:
    """Query features of the current task's training images, stored by dataset position."""

    def __init__(self, size: int = 0):
        self.features: torch.Tensor | None = None
        self.known = torch.zeros(size, dtype=torch.bool)

    def lookup(self, index: torch.Tensor, x: torch.Tensor, compute) -> torch.Tensor:
        index = index.cpu()
        missing = ~self.known[index]
        if bool(missing.any()):
            fresh = compute(x[missing.to(x.device)])
            if self.features is None:
                self.features = fresh.new_zeros(len(self.known), fresh.shape[1])
            self.features[index[missing].to(fresh.device)] = fresh
            self.known[index[missing]] = True
        return self.features[index.to(self.features.device)]


class PromptStrategy(CLStrategy):
    """Base of the prompt methods: frozen backbone, one extra no-grad query pass per image."""

    Config = PromptConfig
    forward_passes_per_image = 2  # the frozen query pass + the prompted pass
    optimizer_name = "adam"
    requires = (injection.promptable,)

    def query(self) -> torch.Tensor:
        """q(x) for the current mini-batch, from the cache when enabled and training."""
        model = self.model
        compute = lambda x: injection.query_features(model.backbone, model.normalize(x))  # noqa: E731
        if self.is_training and self.config.cache_queries:
            return self._query_cache.lookup(self.mbatch[2], self.mb_x, compute)
        return compute(self.mb_x)

    def make_train_dataloader(self, **kwargs):
        if self.config.cache_queries:
            self.adapted_dataset = IndexedItems(self.adapted_dataset)
            self._query_cache = QueryCache(len(self.adapted_dataset))
        super().make_train_dataloader(**kwargs)

    def prepare_model(self, model) -> None:
        type(self).validate(self.config, self.context)  # also when built outside the runner
        model.backbone.requires_grad_(False)

    @classmethod
    def resolve_blocks(cls, config, depth: int) -> list[int]:
        """``config.prompt_blocks`` in a ``depth``-block ViT: the Config's default list is cut to
        the blocks that exist, a user's list must exist (``injection.prompt_blocks``)."""
        return injection.prompt_blocks(config.prompt_blocks, type(config)().prompt_blocks, depth,
                                       cls.registered_name)

    def checked_prompt_blocks(self, vit) -> list[int]:
        """The blocks this method prefix-tunes in ``vit``, each checked to be promptable."""
        blocks = self.resolve_blocks(self.config, len(vit.blocks))
        injection.check_promptable(vit, blocks)
        return blocks

    def make_scheduler_for_task(self, optimizer):
        return cosine_per_epoch(optimizer, self.config.epochs) if self.config.schedule == "cosine" else None

    def clip_groups(self) -> list[list[torch.nn.Parameter]]:
        """The parameter sets whose gradient norm is clipped to ``grad_clip``, each on its own.
        Default: one set, everything the optimiser steps."""
        return [[p for group in self.optimizer.param_groups for p in group["params"]]]

    def clip_gradients(self) -> None:
        if self.config.grad_clip > 0:
            for params in self.clip_groups():
                torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
