"""One long-lived loader over the union of a test stream, restricted to the seen experiences.

Evaluating after task t used to build one DataLoader (and its worker processes) per experience;
here the whole test stream is one dataset with persistent workers (decoding in small chunks, see
``clbench.loaders``), and a mutable batch sampler chooses the seen part. Batches stay within one experience, in the experience's own order, so the
batches are exactly those of per-experience loaders. Each item carries its experience index so
per-experience counts come from one pass.
"""
from __future__ import annotations

import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler

from clbench import distributed
from clbench.loaders import Rebatched


class _Tagged(Dataset):
    def __init__(self, dataset, index: int):
        self.dataset, self.index = dataset, index

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return item[0], item[1], self.index


class _SeenBatches(Sampler):
    """Per-experience batches of this rank's share, for the first ``n_seen`` experiences."""

    def __init__(self, sizes: list[int], batch_size: int):
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes, self.batch_size, self.n_seen = sizes, batch_size, 0

    def _batches(self):
        for offset, size in zip(self.offsets[: self.n_seen], self.sizes[: self.n_seen]):
            mine = [offset + i for i in distributed.shard_indices(size)]
            for start in range(0, len(mine), self.batch_size):
                yield mine[start:start + self.batch_size]

    def __iter__(self):
        return self._batches()

    def __len__(self):
        return sum(1 for _ in self._batches())


class UnionLoader:
    def __init__(self, stream, batch_size: int, num_workers: int, device: torch.device,
                 generator=None):
        self.stream = stream
        datasets = [_Tagged(exp.dataset.eval(), i) for i, exp in enumerate(stream)]
        self.sampler = _SeenBatches([len(d) for d in datasets], batch_size)
        self.loader = Rebatched(ConcatDataset(datasets), self.sampler, num_workers,
                                pin_memory=device.type == "cuda", generator=generator)

    def upto(self, n_seen: int):
        """The loader, now covering experiences ``0 .. n_seen-1``."""
        self.sampler.n_seen = n_seen
        return self.loader
