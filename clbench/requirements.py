"""Structural needs a method declares, checked before any job trains.

A strategy lists them in ``requires``: callables ``(backbone, config, context) -> str | None``
returning what is missing (``None``: fine). ``prepare()`` calls each on a weightless copy of the
backbone (built on the meta device: no weights, no download), so an impossible method/backbone
pair is one line before the first job rather than an exception after earlier jobs trained.
The data-parallel batch check needs the task sizes, known once the benchmark lists its files
(``check_shards``, run for every job after loading and before the first job trains).
"""
from __future__ import annotations

from collections import Counter

from clbench.errors import UsageError


def meta_backbone(spec):
    """The backbone's modules on the meta device (shapes and types, no weights)."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(spec.tag, pretrained=False, num_classes=0, **spec.model_kwargs)


def check_requirements(method: str, strategy_cls, config, context, backbone, spec) -> None:
    """Every ``requires`` entry of the method, as a one-line ``UsageError`` naming the pair."""
    name = spec.name if spec.name == spec.tag else f"{spec.name} ({spec.tag})"
    for requirement in strategy_cls.requires:
        problem = requirement(backbone, config, context)
        if problem:
            raise UsageError(f"{method} cannot run on backbone {name}: {problem}; choose another "
                             "--backbone or drop the method")


def fused_qkv(backbone, config, context) -> str | None:
    """Every block has a fused ``attn.qkv`` Linear (d → 3d): what the qkv adapters wrap."""
    from torch import nn

    blocks = getattr(backbone, "blocks", None)
    if not blocks:
        return "it has no transformer blocks"
    for index, block in enumerate(blocks):
        qkv = getattr(getattr(block, "attn", None), "qkv", None)
        if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features:
            return f"block {index} has no fused attn.qkv Linear (d → 3d)"
    return None


def task_sizes(targets, class_order: list[int], n_tasks: int) -> list[int]:
    """Training images of each task: task k holds the k-th equal slice of the class order."""
    counts = Counter(int(t) for t in targets)
    per_task = len(class_order) // n_tasks
    return [sum(counts[c] for c in class_order[k * per_task:(k + 1) * per_task])
            for k in range(n_tasks)]


def check_shards(sizes: list[int], batch_size: int, processes: int) -> None:
    """Data parallel: every process must get a share of every batch, the last one included,
    for one task's data and for all data seen so far (joint training)."""
    if processes <= 1:
        return
    seen = 0
    for task, n in enumerate(sizes):
        seen += n
        for count in {n, seen}:
            if 0 < count % batch_size < processes:
                raise UsageError(
                    f"--ddp with {processes} processes: {count} training images of task {task + 1} "
                    f"leave a last batch of {count % batch_size} (< {processes}) with --batch-size "
                    f"{batch_size}; choose another --batch-size or --nproc")
