"""Data-parallel training over torch.distributed (``torchrun ... -m clbench run`` or ``--ddp``).

Methods change their parameter sets at every task (new LoRA components, prompt slots), and several
override ``forward`` to reach inside the model, so wrapping the model once in
``DistributedDataParallel`` would miss gradients. Instead we do what DDP does, explicitly: every
rank holds the same model (same seeds), sees a slice of each global batch, and gradients are
summed across ranks after ``backward`` (weighted by slice size, so the update equals the
single-process one on the same global batch up to floating-point reduction order). Evaluation
shards the test set and sums the correct/total counts.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def all_cores() -> int:
    """Every core this process may use (its CPU affinity, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group torchrun describes in the environment; False when not launched so.
    NCCL only when the run computes on CUDA (``--device cpu`` on a GPU machine uses gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return world_size() > 1
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if on_cuda else "gloo"  # CPU statistics reduce over gloo
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def local_device(requested: torch.device) -> torch.device:
    if requested.type == "cuda" and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return requested


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op in a single process); for method statistics."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Global batches from a permutation seeded by (seed, epoch); rank r takes slice r of each.

    With one process this is plain shuffled mini-batching, so single- and multi-process runs see
    the same global batches. With ``draw_seeds``, every item is ``(index, seed)``: the seed of
    that sample's random augmentation in this epoch (``clbench.loaders.SeededDraws``), drawn
    from the same (seed, epoch) generator, so it is the same in every process."""

    def __init__(self, n_samples: int, batch_size: int, seed: int, drop_last: bool = False,
                 draw_seeds: bool = False):
        self.n_samples, self.batch_size, self.seed, self.drop_last = n_samples, batch_size, seed, drop_last
        self.draw_seeds = draw_seeds
        self.epoch = 0

    def __len__(self):
        full, rest = divmod(self.n_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.n_samples, generator=generator).tolist()
        if self.draw_seeds:  # drawn after the permutation: the batches stay the same
            seeds = torch.randint(2**62, (self.n_samples,), generator=generator).tolist()
            order = [(i, seeds[i]) for i in order]
        size, me = world_size(), rank()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start:start + self.batch_size]
            yield batch[me::size]


def shard_indices(n_samples: int) -> list[int]:
    return list(range(rank(), n_samples, world_size()))


def reduce_gradients(parameters, local_samples: int) -> None:
    """Replace each gradient by the sample-weighted mean over ranks (what DDP's all-reduce does)."""
    if world_size() <= 1:
        return
    parameters = list(parameters)
    for p in parameters:  # every rank must reduce the same layout, used or not
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in parameters]
    device = grads[0].device if grads else torch.device("cpu")
    flat = torch.cat([g.reshape(-1) * local_samples for g in grads]
                     + [torch.tensor([float(local_samples)], device=device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    total = flat[-1]
    offset = 0
    for g in grads:
        g.copy_((flat[offset:offset + g.numel()] / total).view_as(g))
        offset += g.numel()
