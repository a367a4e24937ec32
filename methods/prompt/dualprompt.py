"""DualPrompt (Wang et al., ECCV 2022), as implemented in the official CODA-Prompt repository
(GT-RIPL/CODA-Prompt, models/zoo.py class DualPrompt; experiments/*.sh) — the implementation
whose numbers the CODA-Prompt, InfLoRA and SD-LoRA papers report for DualPrompt.

A shared **G-prompt** (key/value prefixes in the first blocks) trains in every task; a pool of
**E-prompts**, one per task, each later block with its own keys: task t trains only E-prompt t and
key t (pulled toward the queries), so earlier E-prompts stay bit-identical. At test each E-block
picks its own top-1 key by cosine with the frozen, un-prompted CLS query.

Recipe, sources and deviations: docs/methods/prompt.md
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from clbench.errors import UsageError
from clbench.methods.prompt import PromptConfig, PromptStrategy, check_promptable, prompted_tokens
from clbench.precision import exact
from clbench.registry import register_method


def halves(prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., L, D) -> first L/2 rows (keys) and last L/2 rows (values)."""
    half = prompt.shape[-2] // 2
    return prompt[..., :half, :], prompt[..., half:, :]


class DualPromptParams(nn.Module):
    """G-prompts (G blocks, L_g, D); E-prompts (E blocks, T, L_e, D) and keys (E blocks, T, D)."""

    def __init__(self, n_g: int, g_length: int, n_e: int, n_tasks: int, e_length: int, dim: int):
        super().__init__()
        self.g_prompts = nn.Parameter(torch.empty(n_g, g_length, dim).uniform_())
        self.e_prompts = nn.Parameter(torch.empty(n_e, n_tasks, e_length, dim).uniform_())
        self.e_keys = nn.Parameter(torch.empty(n_e, n_tasks, dim).uniform_())

    def similarity(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """(B, T) cosine between the (detached) queries and E-block ``layer``'s keys."""
        with exact(query.device):  # ties must not come from bf16
            return (F.normalize(query.detach().float(), dim=1)
                    @ F.normalize(self.e_keys[layer].float(), dim=1).T)


@dataclass
class DualPromptConfig(PromptConfig):
    # Official CODA-Prompt configs: Adam 1e-3, per-epoch cosine, batch 128 (ImageNet-R: 50 epochs).
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 128
    schedule: str = "cosine"
    g_length: int = 6
    e_length: int = 20
    g_blocks: list[int] = field(default_factory=lambda: [0, 1])
    e_blocks: list[int] = field(default_factory=lambda: [2, 3, 4])
    pull_weight: float = 1.0
    match_unseen_keys: bool = True  # official: test-time top-1 over all T keys

    def __post_init__(self):
        super().__post_init__()
        if self.g_length % 2 or self.e_length % 2 or self.g_length < 0 or self.e_length < 2:
            raise UsageError("dualprompt: g_length and e_length must be even (key/value halves)")
        if set(self.g_blocks) & set(self.e_blocks):
            raise UsageError("dualprompt: g_blocks and e_blocks must not overlap")
        if self.pull_weight < 0:
            raise UsageError("dualprompt: pull_weight must be >= 0")


@register_method("dualprompt", "DualPrompt: shared G-prompt (blocks 0-1, length 6) + one E-prompt "
                               "per task (blocks 2-4, length 20) as prefixes, top-1 key match on "
                               "the frozen CLS query (CODA-Prompt repo's implementation)")
class DualPrompt(PromptStrategy):
    """Complementary general/expert prefixes; see the module docstring."""

    Config = DualPromptConfig

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        if benchmark == "digits":
            return {"epochs": 5, "lr": 0.01, "batch_size": 32}
        return {"epochs": {"cifar100": 20, "domainnet": 5}.get(benchmark, 50)}

    @classmethod
    def _blocks(cls, config, depth: int) -> tuple[list[int], list[int]]:
        from clbench.methods.prompt import prompt_blocks

        default = type(config)()
        g = prompt_blocks(config.g_blocks, default.g_blocks, depth, "dualprompt.g_blocks") \
            if config.g_blocks else []
        e = prompt_blocks(config.e_blocks, default.e_blocks, depth, "dualprompt.e_blocks")
        return g, e

    @classmethod
    def validate(cls, config, context) -> None:
        cls._blocks(config, context.backbone_depth)

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        c, vit = self.config, model.backbone
        self.g_blocks, self.e_blocks = self._blocks(c, len(vit.blocks))
        check_promptable(vit, self.g_blocks + self.e_blocks)
        model.add_state("prompt", DualPromptParams(len(self.g_blocks), c.g_length,
                                                   len(self.e_blocks), self.context.n_tasks,
                                                   c.e_length, vit.embed_dim))
        self._pull = 0.0
        self._test_choices = torch.zeros(len(self.e_blocks), self.context.n_tasks, dtype=torch.long)

    def before_task(self, task: int) -> None:
        if task >= self.context.n_tasks:
            raise RuntimeError(f"dualprompt was sized for {self.context.n_tasks} tasks")

    def prefixes(self, query: torch.Tensor, training: bool) -> tuple[dict, torch.Tensor | float]:
        """{block: (keys, values)} for a batch, and the pull term (training only)."""
        prompt, prefixes, pull = self.model.prompt, {}, 0.0
        for i, block in enumerate(self.g_blocks):
            prefixes[block] = halves(prompt.g_prompts[i])
        for i, block in enumerate(self.e_blocks):
            similarity = prompt.similarity(i, query)
            if training:  # the task's own E-prompt; pull its key toward the queries
                pull = pull + (1.0 - similarity[:, self.task]).sum()
                chosen = prompt.e_prompts[i, self.task]
            else:
                if not self.config.match_unseen_keys:
                    similarity = similarity[:, :self.task + 1]
                idx = similarity.argmax(dim=1)  # top-1 (ties: lowest index, as torch.topk)
                self._test_choices[i] += torch.bincount(idx.cpu(), minlength=self.context.n_tasks)
                chosen = prompt.e_prompts[i][idx]
            prefixes[block] = halves(chosen)
        return prefixes, pull

    def forward(self):
        query = self.query()
        prefixes, self._pull = self.prefixes(query, self.is_training)
        tokens = prompted_tokens(self.model.backbone, self.model.normalize(self.mb_x),
                                 prefixes=prefixes)
        return self.model.head(tokens[:, 0])

    def extra_loss(self):
        return self.config.pull_weight * self._pull

    def trainable_parameter_count(self) -> int:
        """G-prompts, this task's E-prompt and key in every E-block, the head."""
        p = self.model.prompt
        per_task = p.e_prompts[:, 0].numel() + p.e_keys[:, 0].numel()
        return p.g_prompts.numel() + per_task + sum(q.numel() for q in self.model.head.parameters())

    def extra_state(self) -> dict:
        return {**super().extra_state(), "g_blocks": self.g_blocks, "e_blocks": self.e_blocks}

    def restore_structure(self, state: dict) -> None:
        if (state.get("g_blocks"), state.get("e_blocks")) != (self.g_blocks, self.e_blocks):
            raise RuntimeError("checkpoint was made with other DualPrompt blocks")
        super().restore_structure(state)

    def task_info(self) -> dict:
        c, p = self.config, self.model.prompt
        choices = self._test_choices.tolist()
        self._test_choices.zero_()
        return {"g_blocks": self.g_blocks, "e_blocks": self.e_blocks,
                "requested_blocks": {"g": list(c.g_blocks), "e": list(c.e_blocks)},
                "trainable_params_this_task": self.trainable_parameter_count(),
                "stored_prompt_params": p.g_prompts.numel() + p.e_prompts.numel(),
                "stored_key_params": p.e_keys.numel(),
                # top-1 E-prompt chosen per E-block over the evaluation since the last report
                "test_e_prompt_choices": choices, "query_cache": c.cache_queries}
