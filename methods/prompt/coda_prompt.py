"""CODA-Prompt (Smith et al., CVPR 2023; official repo GT-RIPL/CODA-Prompt, models/zoo.py).

Per prompted block l, M prompt components P_m with keys K_m and attention vectors A_m. For the
frozen ViT's un-prompted CLS query q(x), every active component gets the weight
α_m = cos(q ⊙ A_m, K_m) (no softmax, no top-k); the block's prompt Σ_m α_m P_m is split into key
and value prefixes of that block (``clbench.methods.prompt``). The components are split evenly
over the tasks: a task's slots are initialised by Gram–Schmidt against the older slots, which stay
bit-identical while later tasks train.

Recipe, sources and deviations: docs/methods/prompt.md
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from clbench.errors import UsageError
from clbench.methods.prompt import (PromptConfig, PromptStrategy, prompted_tokens,
                               split_prefix)
from clbench.precision import exact
from clbench.registry import register_method


def gram_schmidt_rows(matrix: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Copy of ``matrix`` (M, n) whose rows [start, stop) are fresh Gaussian vectors made
    orthonormal to each other and to the span of rows [0, start). Runs in float64 on the CPU
    (at most a few hundred rows) with the CPU generator, so any device draws the same vectors."""
    if stop > matrix.shape[1]:
        raise ValueError(f"cannot fit {stop} orthogonal vectors in dimension {matrix.shape[1]}")
    work = matrix.detach().double().cpu()
    basis = torch.zeros(work.shape[1], 0, dtype=torch.float64)
    if start:
        q, r = torch.linalg.qr(work[:start].T)
        r = r.diagonal().abs()
        basis = q[:, r > 1e-10 * float(r.max())]  # drop directions of dependent old rows
    for row in range(start, stop):
        v = torch.randn(work.shape[1], dtype=torch.float64)
        for _ in range(2):  # re-orthogonalise once for numerical exactness
            v = v - basis @ (basis.T @ v)
        v = v / v.norm()
        basis = torch.cat([basis, v.unsqueeze(1)], dim=1)
        work[row] = v
    out = matrix.detach().clone()
    out[start:stop] = work[start:stop].to(out.device, out.dtype)
    return out


def ortho_penalty(matrix: torch.Tensor) -> torch.Tensor:
    """mean((B Bᵀ − I)²) over the rows of B (official ``ortho_penalty``, device-agnostic)."""
    eye = torch.eye(matrix.shape[0], device=matrix.device, dtype=matrix.dtype)
    return ((matrix @ matrix.T - eye) ** 2).mean()


class CodaComponents(nn.Module):
    """P (layers, M, L_p, D), K and A (layers, M, D): every slot of every prompted block."""

    def __init__(self, n_layers: int, n_components: int, length: int, dim: int):
        super().__init__()
        self.prompts = nn.Parameter(torch.zeros(n_layers, n_components, length, dim))
        self.keys = nn.Parameter(torch.zeros(n_layers, n_components, dim))
        self.attention = nn.Parameter(torch.zeros(n_layers, n_components, dim))

    @torch.no_grad()
    def init_slots(self, start: int, stop: int) -> None:
        """Gram–Schmidt initialisation of slots [start, stop) in every layer."""
        for layer in range(self.prompts.shape[0]):
            for param in (self.keys, self.attention):
                param[layer] = gram_schmidt_rows(param[layer], start, stop)
            flat = self.prompts[layer].flatten(1)
            self.prompts[layer] = gram_schmidt_rows(flat, start, stop).view_as(self.prompts[layer])

    def active(self, layer: int, start: int, stop: int, train: bool):
        """(P, K, A) of slots [0, stop); in training slots [0, start) are detached (frozen)."""
        def part(param):
            p = param[layer, :stop]
            return torch.cat([p[:start].detach(), p[start:]]) if train and start else p
        return part(self.prompts), part(self.keys), part(self.attention)


def component_weights(query: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor):
    """α (B, M) = cos(q ⊙ A_m, K_m)."""
    with exact(query.device):  # cosines in float32 under bf16
        attended = F.normalize(query.float().unsqueeze(1) * attention.float().unsqueeze(0), dim=2)
        return torch.einsum("bmd,md->bm", attended, F.normalize(keys.float(), dim=1))


@dataclass
class CodaPromptConfig(PromptConfig):
    # Official configs: Adam 1e-3, per-epoch cosine, batch 128; epochs per benchmark below.
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 128
    schedule: str = "cosine"
    n_components: int = 100  # over the whole run: slots per task = n_components // n_tasks
    prompt_length: int = 8
    prompt_blocks: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    ortho_weight: float = 0.0  # released scripts: 0.0 ("100 8 0.0"); earlier code: 0.1

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_length % 2 or self.prompt_length < 2:
            raise UsageError("coda-prompt: prompt_length must be even (key/value halves)")
        if self.n_components < 1 or self.ortho_weight < 0:
            raise UsageError("coda-prompt: n_components must be >= 1 and ortho_weight >= 0")


@register_method("coda-prompt", "CODA-Prompt: attention-weighted sum of 100 prompt components "
                                "(split over tasks, Gram–Schmidt init, old ones frozen), prefix "
                                "tuning in blocks 0-4, CLS head (official code)")
class CodaPrompt(PromptStrategy):
    """Decomposed, query-weighted prompts; see the module docstring."""

    Config = CodaPromptConfig

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        if benchmark == "digits":  # 96-wide keys hold at most 96 orthogonal slots
            return {"epochs": 5, "lr": 0.01, "batch_size": 32, "n_components": 50}
        epochs = {"cifar100": 20, "domainnet": 5}.get(benchmark, 50)  # IN-R: 50; CUB/IN-A: none
        return {"epochs": epochs}

    @classmethod
    def validate(cls, config, context) -> None:
        if config.n_components // context.n_tasks < 1:
            raise UsageError(f"coda-prompt: {config.n_components} components cannot be split over "
                             f"{context.n_tasks} tasks; raise n_components")
        if context.embed_dim and config.n_components > context.embed_dim:
            raise UsageError(f"coda-prompt: {config.n_components} components cannot be orthogonal "
                             f"in {context.embed_dim} dimensions; lower n_components")
        cls.resolve_blocks(config, context.backbone_depth)

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        c = self.config
        vit = model.backbone
        self.per_task = c.n_components // self.context.n_tasks
        self.prompt_blocks = self.checked_prompt_blocks(vit)
        model.add_state("prompt", CodaComponents(len(self.prompt_blocks), c.n_components,
                                                 c.prompt_length, vit.embed_dim))
        self._ortho = 0.0

    def slots(self, task: int) -> tuple[int, int]:
        """First and one-past-last slot of ``task``."""
        if task >= self.context.n_tasks:
            raise RuntimeError(f"coda-prompt was sized for {self.context.n_tasks} tasks")
        return task * self.per_task, (task + 1) * self.per_task

    def before_task(self, task: int) -> None:
        self.model.prompt.init_slots(*self.slots(task))

    def forward(self):
        model, vit = self.model, self.model.backbone
        query = self.query()
        start, stop = self.slots(self.task)
        training = self.is_training
        prefixes, ortho = {}, 0.0
        for layer, block in enumerate(self.prompt_blocks):
            prompts, keys, attention = model.prompt.active(layer, start, stop, training)
            alpha = component_weights(query, keys, attention)
            prefixes[block] = split_prefix(torch.einsum("bm,mld->bld", alpha, prompts))
            if training and self.config.ortho_weight > 0:
                ortho = ortho + sum(ortho_penalty(t) for t in (keys, attention, prompts.flatten(1)))
        self._ortho = ortho
        tokens = prompted_tokens(vit, model.normalize(self.mb_x), prefixes=prefixes)
        return model.head(tokens[:, 0])

    def extra_loss(self):
        return self.config.ortho_weight * self._ortho

    def trainable_parameter_count(self) -> int:
        """This task's new slots (old ones are frozen) plus the head."""
        prompt = self.model.prompt
        per_slot = sum(p[:, 0].numel() for p in (prompt.prompts, prompt.keys, prompt.attention))
        return self.per_task * per_slot + sum(p.numel() for p in self.model.head.parameters())

    def extra_state(self) -> dict:
        return {**super().extra_state(), "prompt_blocks": list(self.prompt_blocks),
                "slots_per_task": self.per_task}

    def restore_structure(self, state: dict) -> None:
        if (state.get("prompt_blocks"), state.get("slots_per_task")) != (self.prompt_blocks,
                                                                          self.per_task):
            raise RuntimeError("checkpoint was made with other prompt blocks / slots per task")
        super().restore_structure(state)

    def task_info(self) -> dict:
        c = self.config
        return {"prompt_blocks": list(self.prompt_blocks),
                "requested_prompt_blocks": list(c.prompt_blocks),
                "active_components": self.slots(self.task)[1], "slots_per_task": self.per_task,
                "ortho_weight": c.ortho_weight, "query_cache": c.cache_queries}
