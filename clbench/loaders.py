"""Data loaders that keep every worker busy without changing a single batch.

Two costs dominate a JPEG pipeline between the model's steps: at the start of every epoch the
workers restart from nothing, and a worker decodes a whole batch (128–256 images) before the
first one arrives, so few batches mean few busy workers. ``Rebatched`` splits each batch of a
batch sampler into chunks of ``chunk`` samples for the workers and concatenates them back in
order, so the model sees exactly the sampler's batches; with ``continuous=True`` one iterator
runs over epoch after epoch, and the workers prefetch the next epoch while the current one
trains. Without workers both are plain iteration over the same batches.

Evaluation uses chunks (a few large batches per pass; the first batch of a pass is cut so that
every worker decodes a part of it, ``first_chunk``). Training streams whole batches
(``chunk=None``): the continuous stream already keeps the workers busy, and concatenating
chunks would cost the host a copy of every batch (``scripts/bench_loading.py`` "transport").
Neither choice changes a number: ``SeededDraws`` gives every training sample its own random
state, so the augmentation does not depend on which worker (or process) loads the sample.
"""
from __future__ import annotations

import collections
import itertools
import random

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

CHUNK = 32  # samples a worker decodes per request, at most


def first_chunk(batch_size: int, workers: int, chunk: int = CHUNK) -> int:
    """Chunk size for a pass's first batch: small enough that every worker decodes a part of it,
    so the pass starts after batch/workers decodes, not ``chunk`` (``scripts/bench_loading.py``,
    "first batch"). Later batches keep ``chunk``: every request costs the host a message."""
    return max(1, min(chunk, -(-batch_size // max(workers, 1))))


class SeededDraws(Dataset):
    """Items ``(index, seed)`` (``ShardedBatchSampler(draw_seeds=True)``): ``dataset[index]`` with
    torch's and Python's random generators seeded by ``seed`` (what torchvision's random
    transforms draw from) and restored afterwards. A sample's crop and flip then depend on the
    run's seed, the epoch and the sample only: not on the worker count, the chunking, the process
    in a DDP run, or the order in which workers happen to load samples."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        generator = torch.default_generator  # torch.manual_seed would also visit every device
        torch_state, python_state = generator.get_state(), random.getstate()
        generator.manual_seed(seed)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(torch_state)
            random.setstate(python_state)


class _Chunks(Sampler):
    """The batches of ``batch_sampler`` cut into chunks (the first of each pass finer, see
    ``first_chunk``); records how many chunks each batch has."""

    def __init__(self, batch_sampler, chunk: int | None, continuous: bool, workers: int):
        self.batch_sampler, self.chunk, self.continuous = batch_sampler, chunk, continuous
        self.workers = workers
        self.pieces: collections.deque[int] = collections.deque()

    def __iter__(self):
        epochs = itertools.repeat(None) if self.continuous else [None]
        for _ in epochs:
            for position, batch in enumerate(self.batch_sampler):
                size = max(len(batch), 1)
                if self.chunk:
                    size = first_chunk(size, self.workers, self.chunk) if position == 0 else self.chunk
                chunks = [batch[i:i + size] for i in range(0, len(batch), size)] or [batch]
                self.pieces.append(len(chunks))
                yield from chunks


def _concat(chunks, pin: bool):
    """One batch from its chunks; with ``pin``, written straight into page-locked memory. A
    batch in pageable memory makes the host wait at every ``.to(device, non_blocking=True)``
    until the device has finished the previous step, so the host's work and the device's
    add up instead of overlapping. Pinning here is the single copy a DataLoader's pin thread
    would make (its thread is off for chunks: it would pin each chunk only to copy it again)."""
    if len(chunks) == 1:
        return [t.pin_memory() for t in chunks[0]] if pin else chunks[0]
    batch = []
    for parts in zip(*chunks):
        out = torch.empty((sum(len(t) for t in parts), *parts[0].shape[1:]),
                          dtype=parts[0].dtype, pin_memory=pin)
        batch.append(torch.cat(parts, out=out))
    return batch


class Rebatched:
    """An iterable of the batch sampler's batches (see the module docstring)."""

    def __init__(self, dataset, batch_sampler, num_workers: int, pin_memory: bool,
                 continuous: bool = False, chunk: int | None = CHUNK, generator=None):
        self.batch_sampler = batch_sampler
        self.continuous = continuous
        chunked = chunk is not None and num_workers > 0
        self.chunks = _Chunks(batch_sampler, chunk if chunked else None, continuous, num_workers)
        # Whole batches are pinned by the DataLoader's pin thread; chunks straight into the batch.
        self.pin_chunks = pin_memory and chunked
        self.loader = DataLoader(dataset, batch_sampler=self.chunks, num_workers=num_workers,
                                 pin_memory=pin_memory and not chunked,
                                 persistent_workers=num_workers > 0 and not continuous,
                                 generator=generator)
        self._stream = None

    @property
    def dataset(self):
        return self.loader.dataset

    def __len__(self):
        return len(self.batch_sampler)

    def _next_batch(self, source):
        first = next(source)
        pieces = self.chunks.pieces.popleft()
        return _concat([first, *(next(source) for _ in range(pieces - 1))], self.pin_chunks)

    def __iter__(self):
        if not self.continuous:
            self.chunks.pieces.clear()
            source = iter(self.loader)
            while True:
                try:
                    yield self._next_batch(source)
                except StopIteration:
                    return
        # One long iterator; each pass is one epoch of it. A pass left early (a method's
        # statistics loop that breaks) still ends its epoch, so later passes see the batches
        # a fresh loader per pass would have given.
        if self._stream is None:
            self._stream, self._owed = iter(self.loader), 0
        for _ in range(self._owed):
            self._next_batch(self._stream)
        self._owed = len(self)
        while self._owed:
            batch = self._next_batch(self._stream)
            self._owed -= 1
            yield batch
