"""Chunked, continuous loading changes no batch: same samples, same order, same epochs."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from clbench.distributed import ShardedBatchSampler
from clbench.loaders import CHUNK, Rebatched, first_chunk
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


@pytest.mark.parametrize("batch", [1, 10, 64, 256, 1000])
@pytest.mark.parametrize("workers", [0, 1, 2, 16, 64])
def test_first_chunk_gives_every_worker_part_of_the_first_batch(batch, workers):
    """No worker decodes more of the first batch than its even share (rounded up), in as few
    requests as that allows: the first batch waits for batch/workers decodes, not CHUNK."""
    chunk, share = first_chunk(batch, workers), -(-batch // max(workers, 1))
    assert 1 <= chunk <= min(CHUNK, share)
    assert chunk == min(CHUNK, share)  # the largest such chunk: the fewest requests


@pytest.mark.parametrize("continuous", [False, True])
def test_only_each_passs_first_batch_is_cut_finer(continuous):
    sampler = ShardedBatchSampler(40, 16, seed=0)  # batches of 16, 16, 8
    loader = Rebatched(_data(40), sampler, num_workers=2, pin_memory=False, continuous=continuous,
                       chunk=16)
    sizes = [len(c) for c in itertools.islice(iter(loader.chunks), 8)]
    one_pass = [8, 8, 16, 8]  # the first batch over the 2 workers, then chunks of 16
    assert sizes == (one_pass * 2 if continuous else one_pass)


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


def _augmented_epochs(folder, names, workers, chunk, seeded=True, epochs=2):
    from clbench.datasets import ImageFiles, train_transform
    from clbench.loaders import SeededDraws

    images = ImageFiles(folder, names, [0] * len(names), train_transform(8))
    data = SeededDraws(images) if seeded else images
    sampler = ShardedBatchSampler(len(images), 6, seed=5, draw_seeds=seeded)
    loader = Rebatched(data, sampler, workers, pin_memory=False, continuous=True, chunk=chunk)
    torch.manual_seed(0)
    return [torch.cat([x for x, _ in loader]) for _ in range(epochs)]


def test_augmentation_draws_depend_on_the_sample_not_on_workers_or_chunks(tmp_path):
    """RandomResizedCrop + flip give the same crops whatever the worker count and chunking."""
    from fixtures_data import image_tree

    names = image_tree(tmp_path, ["a", "b"], 7, 24, seed=3)
    reference = _augmented_epochs(tmp_path, names, workers=0, chunk=None)
    for workers, chunk in ((2, None), (2, 4), (1, 1)):
        got = _augmented_epochs(tmp_path, names, workers, chunk)
        assert all(torch.equal(a, b) for a, b in zip(got, reference)), (workers, chunk)
    # the draws are random: another epoch crops the same images differently
    assert not torch.equal(reference[0], reference[1])
    # and without per-sample seeds they would depend on the workers (what this guards against)
    unseeded = [_augmented_epochs(tmp_path, names, w, None, seeded=False) for w in (0, 2)]
    assert not torch.equal(unseeded[0][0], unseeded[1][0])


def test_seeded_draws_leave_the_callers_random_state_alone():
    from clbench.loaders import SeededDraws

    data = SeededDraws(Images(torch.zeros(4, 1, 2, 2), torch.arange(4)))
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    data[(2, 12345)]
    assert torch.equal(torch.rand(3), expected)


def test_default_worker_count_is_all_cores_on_a_gpu_and_none_on_a_cpu(monkeypatch):
    import os

    from clbench.runner import loader_workers

    from types import SimpleNamespace

    from clbench.datasets import ImageFiles, test_transform

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    files = ImageFiles(".", [], [], test_transform(16))
    jpegs, tensors = SimpleNamespace(train=files, test=files), SimpleNamespace(train=_data(), test=_data())
    assert (loader_workers(None, cuda, jpegs), loader_workers(None, cpu, jpegs)) == (16, 0)
    assert loader_workers(None, cuda, tensors) == 0  # already in memory: nothing to decode
    assert (loader_workers(3, cuda, jpegs), loader_workers(3, cpu, tensors)) == (3, 3)  # as asked
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node 4: a quarter each
    assert loader_workers(None, cuda, jpegs) == 4


def test_each_ddp_rank_gets_the_single_process_seeds_of_its_samples(monkeypatch):
    from clbench import distributed

    single = list(ShardedBatchSampler(23, 8, seed=4, draw_seeds=True))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    ranks = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        ranks.append(list(ShardedBatchSampler(23, 8, seed=4, draw_seeds=True)))
    for whole, mine, theirs in zip(single, *ranks):
        assert sorted(mine + theirs) == sorted(whole) and mine == whole[0::2]
    assert len({seed for batch in single for _, seed in batch}) == 23  # one seed per sample
