"""Chunked, continuous loading changes no batch: same samples, same order, same epochs."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from clbench.distributed import ShardedBatchSampler
from clbench.loaders import Rebatched
from helpers import Images


def _data(n=53):
    return Images(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(),
                  torch.arange(n) % 7)


def _epochs(loader, passes, stop_early_at=None):
    seen = []
    for p in range(passes):
        batches = []
        for i, (x, y) in enumerate(loader):
            batches.append((x[:, 0, 0, 0].long().tolist(), y.tolist()))
            if p == stop_early_at and i == 1:
                break  # a statistics pass that stops early
        seen.append(batches)
    return seen


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("continuous", [False, True])
def test_rebatched_gives_the_plain_loaders_batches(workers, continuous):
    data = _data()
    plain = DataLoader(data, batch_sampler=ShardedBatchSampler(len(data), 16, seed=3))
    ours = Rebatched(data, ShardedBatchSampler(len(data), 16, seed=3), workers, pin_memory=False,
                     continuous=continuous, chunk=5)
    expected = _epochs(plain, 4, stop_early_at=1)
    assert _epochs(ours, 4, stop_early_at=1) == expected
    assert len(ours) == 4 and [len(b[0]) for b in expected[0]] == [16, 16, 16, 5]
    assert sorted(i for b in expected[2] for i in b[0]) == list(range(len(data)))  # a permutation
