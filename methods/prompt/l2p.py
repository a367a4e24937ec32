"""L2P (Wang et al., CVPR 2022) and the "L2P++" variant run by the CODA-Prompt code.

A pool of M prompts, each with a learnable key. The frozen ViT's un-prompted CLS feature q(x) is
matched to the keys by cosine similarity; the top-N prompts are used, and a pull term draws the
selected keys toward the queries. The ViT, both passes, stays frozen: only prompts, keys and the
head train. ``l2p`` (paper / official JAX + PyTorch port): input prompt tuning with a batch-wise
prompt vote; ``l2p-pp`` (CODA-Prompt repo, class ``L2P``): prefix tuning with per-sample
selection. The prompt injection and the two-pass strategy base live in ``clbench.methods.prompt``.

Recipe, sources and deviations: docs/methods/prompt.md
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from clbench.errors import UsageError
from clbench.methods.prompt import (PromptConfig, PromptStrategy, check_promptable, prompted_tokens,
                               split_prefix)
from clbench.precision import exact
from clbench.registry import register_method


class PromptPool(nn.Module):
    """M prompts of L_p × D tokens, one key in R^D each, initialised uniform in ``init_range``."""

    def __init__(self, size: int, length: int, dim: int, init_range=(-1.0, 1.0)):
        super().__init__()
        low, high = init_range
        self.prompts = nn.Parameter(torch.empty(size, length, dim).uniform_(low, high))
        self.keys = nn.Parameter(torch.empty(size, dim).uniform_(low, high))

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """(B, M) cosine between each query and each key; the query carries no gradient."""
        with exact(query.device):  # ties must not come from bf16
            return F.normalize(query.detach().float(), dim=1) @ F.normalize(self.keys.float(), dim=1).T


def take(table: torch.Tensor, idx: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``table[idx]`` (dim 0) or ``table[:, idx]`` (dim 1) for an integer tensor ``idx``, through
    ``index_select``: its gradient (``index_add_``) sums repeated indices in a fixed order. Advanced
    indexing's gradient, ``index_put_(accumulate=True)``, adds them with float atomics from all
    threads on a multi-threaded CPU once it has >= 32,768 elements, in whatever order the threads
    run; a batch-wise vote repeats every prompt index B times, so two identical CPU runs ended with
    different prompts (by up to 1e-4 on digits)."""
    return table.index_select(dim, idx.reshape(-1)).unflatten(dim, tuple(idx.shape))


def select_prompts(similarity: torch.Tensor, top_k: int, batchwise: bool) -> torch.Tensor:
    """(B, N) prompt indices: each sample's top-N by similarity, or with ``batchwise`` the N
    indices occurring most often among those, for every sample (ties -> lower index)."""
    idx = similarity.topk(top_k, dim=1).indices
    if not batchwise:
        return idx
    counts = torch.bincount(idx.flatten(), minlength=similarity.shape[1])
    majority = torch.argsort(-counts, stable=True)[:top_k]
    return majority.unsqueeze(0).expand(similarity.shape[0], -1)


def pull_loss(similarity: torch.Tensor, idx: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cosine distance between queries and their selected keys.

    ``"l2p"``: sum over each sample's N selected keys, mean over the batch (the port's
    ``-sum(cos)/B`` up to a constant). ``"coda"``: the CODA code's ``(1 - cos[:, idx]).sum()``,
    which indexes with the whole (B, N) index tensor and so sums over every (sample, key selected
    by any sample) pair of the batch.
    """
    if reduction == "l2p":
        return (1.0 - similarity.gather(1, idx)).sum(dim=1).mean()
    if reduction == "coda":
        return (1.0 - take(similarity, idx, dim=1)).sum()
    raise ValueError(f"pull reduction must be 'l2p' or 'coda', got {reduction!r}")


@dataclass
class L2PConfig(PromptConfig):
    # Paper / PyTorch port (configs/cifar100_l2p.py): batch 16, lr 0.03·16/256, 5 epochs, constant.
    epochs: int = 5
    lr: float = 0.001875
    batch_size: int = 16
    eval_batch_size: int = 16  # batch-wise selection makes test predictions depend on it
    schedule: str = "constant"
    grad_clip: float = 1.0
    pool_size: int = 10
    prompt_length: int = 5
    top_k: int = 5
    batchwise_prompt: bool = True
    pull_weight: float = 0.1
    pull_reduction: str = "l2p"
    insertion: str = "input"  # "input" (prompt tuning) or "prefix" (prefix tuning)
    prompt_blocks: list[int] = field(default_factory=lambda: [0])  # prefix insertion only
    head_input: str = "prompt"  # "prompt" (mean of prompt-token outputs) or "cls"
    init_range: list[float] = field(default_factory=lambda: [-1.0, 1.0])

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.top_k <= self.pool_size:
            raise UsageError(f"l2p: top_k must be in [1, pool_size={self.pool_size}], got {self.top_k}")
        if self.insertion not in ("input", "prefix") or self.head_input not in ("prompt", "cls"):
            raise UsageError("l2p: insertion must be input|prefix and head_input prompt|cls")
        if self.head_input == "prompt" and self.insertion != "input":
            raise UsageError("l2p: head_input='prompt' needs insertion='input'")
        if self.insertion == "prefix" and self.prompt_length % 2:
            raise UsageError("l2p: prefix tuning splits each prompt in halves; use an even length")
        if self.pull_reduction not in ("l2p", "coda"):
            raise UsageError(f"l2p: pull_reduction must be l2p|coda, got {self.pull_reduction!r}")
        if len(self.init_range) != 2 or self.init_range[0] > self.init_range[1]:
            raise UsageError(f"l2p: init_range must be [low, high], got {self.init_range}")


@register_method("l2p", "L2P (Learning to Prompt): pool 10 × length 5, top-5 batch-wise key "
                        "matching on the frozen ViT's CLS query, input prompts, head on prompt "
                        "tokens (paper / official port)")
class L2P(PromptStrategy):
    """Prompt pool with key-query matching; see the module docstring for both variants."""

    Config = L2PConfig

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        if benchmark == "digits":
            return {"epochs": 5, "lr": 0.01, "batch_size": 32, "eval_batch_size": 64}
        # The port's CIFAR-100 recipe; L2P has no official config for the other benchmarks.
        return {}

    @classmethod
    def validate(cls, config, context) -> None:
        if config.insertion == "prefix":
            cls.resolve_blocks(config, context.backbone_depth)

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        c = self.config
        vit = model.backbone
        self.prompt_blocks = self.resolve_blocks(c, len(vit.blocks)) if c.insertion == "prefix" else []
        check_promptable(vit, self.prompt_blocks)
        n_pools = max(len(self.prompt_blocks), 1)
        model.add_state("prompt", nn.ModuleList(
            PromptPool(c.pool_size, c.prompt_length, vit.embed_dim, tuple(c.init_range))
            for _ in range(n_pools)))
        self._pull = 0.0
        self._prompt_counts = torch.zeros(c.pool_size, dtype=torch.long)

    def before_task(self, task: int) -> None:
        self._prompt_counts.zero_()

    def forward(self):
        c = self.config
        model, vit = self.model, self.model.backbone
        query = self.query()
        x = model.normalize(self.mb_x)
        pull, input_prompts, prefixes = 0.0, None, {}
        for i, pool in enumerate(model.prompt):
            similarity = pool.similarity(query)
            idx = select_prompts(similarity, c.top_k, c.batchwise_prompt)
            if self.is_training:
                pull = pull + pull_loss(similarity, idx, c.pull_reduction)
                # summed over prompted blocks when each has its own pool (Deep L2P++)
                self._prompt_counts += torch.bincount(idx.flatten().cpu(), minlength=c.pool_size)
            chosen = take(pool.prompts, idx)  # (B, N, L_p, D); see take()
            if c.insertion == "input":
                input_prompts = chosen.flatten(1, 2)
            else:
                prefixes[self.prompt_blocks[i]] = split_prefix(chosen)
        tokens = prompted_tokens(vit, x, input_prompts=input_prompts, prefixes=prefixes)
        self._pull = pull
        if c.head_input == "prompt":
            start = vit.num_prefix_tokens
            features = tokens[:, start:start + input_prompts.shape[1]].mean(dim=1)
        else:
            features = tokens[:, 0]
        return model.head(features)

    def extra_loss(self):
        return self.config.pull_weight * self._pull

    def extra_state(self) -> dict:
        return {**super().extra_state(), "prompt_blocks": list(self.prompt_blocks)}

    def restore_structure(self, state: dict) -> None:
        if state.get("prompt_blocks", []) != list(self.prompt_blocks):
            raise RuntimeError(f"checkpoint was made with prompt blocks {state.get('prompt_blocks')},"
                               f" this model uses {self.prompt_blocks}")
        super().restore_structure(state)

    def task_info(self) -> dict:
        c = self.config
        return {
            "insertion": c.insertion,
            "prompt_blocks": list(self.prompt_blocks),
            "requested_prompt_blocks": list(c.prompt_blocks) if c.insertion == "prefix" else [],
            "selection": "batch-wise" if c.batchwise_prompt else "per-sample",
            # The test stream is evaluated one task at a time, so a batch-wise vote at test time
            # only ever sees images of one task (as in the official port).
            "eval_batch_size": c.eval_batch_size,
            "train_prompt_counts": self._prompt_counts.tolist(),
            "query_cache": c.cache_queries,
        }


@dataclass
class L2PPlusPlusConfig(L2PConfig):
    # Official CODA-Prompt configs: Adam 1e-3, per-epoch cosine, batch 128 (ImageNet-R: 50 epochs).
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 128
    eval_batch_size: int = 256
    schedule: str = "cosine"
    grad_clip: float = 0.0
    pool_size: int = 30
    prompt_length: int = 20
    top_k: int = 5
    batchwise_prompt: bool = False
    pull_weight: float = 1.0
    pull_reduction: str = "coda"
    insertion: str = "prefix"
    prompt_blocks: list[int] = field(default_factory=lambda: [0])
    head_input: str = "cls"
    init_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # nn.init.uniform_


@register_method("l2p-pp", "\"L2P++\", the L2P re-implementation in the CODA-Prompt code (source "
                           "of the published ImageNet-R/DomainNet L2P numbers): pool 30 × length "
                           "20, top-5 per sample, prefix tuning in block 0, CLS head")
class L2PPlusPlus(L2P):
    """L2P++ as run by the official CODA-Prompt repo; ``prompt_blocks=[0,1,2,3,4]`` = Deep L2P++."""

    Config = L2PPlusPlusConfig

    @classmethod
    def defaults_for(cls, benchmark: str, n_tasks: int) -> dict:
        if benchmark == "digits":
            return {"epochs": 5, "lr": 0.01, "batch_size": 32, "eval_batch_size": 64}
        epochs = {"cifar100": 20, "domainnet": 5}.get(benchmark, 50)  # IN-R: 50; CUB/IN-A: none
        return {"epochs": epochs}
