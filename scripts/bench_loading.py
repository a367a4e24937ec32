"""Data loading, side by side on one image tree (class sub-folders of JPEGs):

1. evaluation: whole 256-image batches per worker vs the same batches decoded in 32-image chunks
   (``clbench.loaders.Rebatched``), and the chunks read from ``--decoded-cache``'s stored test
   tensors (the fixed test transform applied once);
2. training (RandomResizedCrop + flip, batch 128): decoding the JPEGs vs reading the decoded-image
   cache (``clbench.decoded_cache``, what ``clbench run --decoded-cache`` uses);
3. transport, the host's share of every training batch: images as float32 (ToTensor) vs uint8
   (PILToTensor, what the loaders deliver; the model scales them on the device), in whole batches
   vs 32-image chunks, through the training loader (``Rebatched``, continuous) from workers that
   only copy one ready image, so the host's receiving and concatenating is what is timed;
4. first batch: a 1,200-image evaluation (batch 256) from ``--latency-workers`` workers (default
   16, the GPU machine's cores) that each "decode" 120 images/s by sleeping, so it runs as on that
   machine whatever the cores here: every batch in 32-image chunks vs the first batch cut finer
   (``clbench.loaders.first_chunk``, what evaluation does).

    python scripts/bench_loading.py <imagenet-r>/train [--workers N] [--size 224]

Prints images/s of full passes (best of three after a warm-up) and the ratios. The tree of
``clbench perf --sections e2e --e2e-data DIR`` works, as does a real ImageNet-R split.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from torch.utils.data import DataLoader, Dataset

from clbench import loaders
from clbench.datasets import ImageFiles, list_image_folder, test_transform, train_transform
from clbench.decoded_cache import DecodedImages, build
from clbench.distributed import ShardedBatchSampler
from clbench.evaluation import _SeenBatches
from clbench.loaders import CHUNK, Rebatched


def best_rate(loader, n_images: int) -> float:
    times = []
    for _ in range(4):
        began = time.perf_counter()
        for _batch in loader:
            pass
        times.append(time.perf_counter() - began)
    return n_images / min(times[1:])


def eval_rate(data, workers: int, chunk: int) -> float:
    sampler = _SeenBatches([len(data)], 256)
    sampler.n_seen = 1
    return best_rate(Rebatched(data, sampler, workers, pin_memory=False, chunk=chunk), len(data))


def train_rate(data, workers: int) -> float:
    loader = DataLoader(data, batch_size=128, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    return best_rate(loader, len(data))


class ReadyImage(Dataset):
    """One ready image, copied per item: workers cost next to nothing."""

    def __init__(self, n: int, size: int, dtype: torch.dtype):
        self.n, self.image = n, torch.randint(0, 256, (3, size, size), dtype=torch.uint8).to(dtype)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.image.clone(), i % 10


class SlowImage(ReadyImage):
    """A ready uint8 image that takes ``seconds`` to load without using a core (a sleep)."""

    def __init__(self, n: int, size: int, seconds: float):
        super().__init__(n, size, torch.uint8)
        self.seconds = seconds

    def __getitem__(self, i):
        time.sleep(self.seconds)
        return super().__getitem__(i)


def first_batch_rates(split_first: bool, workers: int, size: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s of the pass), best of three after a warm-up."""
    data = SlowImage(1200, size, 1 / 120)
    sampler = _SeenBatches([len(data)], 256)
    sampler.n_seen = 1
    loader = Rebatched(data, sampler, workers, pin_memory=False)
    firsts, passes = [], []
    as_others = contextlib.nullcontext() if split_first else mock.patch.object(
        loaders, "first_chunk", lambda size, workers, chunk=CHUNK: chunk)
    with as_others:
        for _ in range(4):
            _timed_pass(loader, firsts, passes)
    return min(firsts[1:]), len(data) / min(passes[1:])


def _timed_pass(loader, firsts: list, passes: list) -> None:
    began = time.perf_counter()
    batches = iter(loader)
    next(batches)
    firsts.append(time.perf_counter() - began)
    for _batch in batches:
        pass
    passes.append(time.perf_counter() - began)


def transport_rate(dtype: torch.dtype, chunk: int | None, workers: int, size: int) -> float:
    data = ReadyImage(128 * 24, size, dtype)
    loader = Rebatched(data, ShardedBatchSampler(len(data), 128, seed=0), workers,
                       pin_memory=torch.cuda.is_available(), continuous=True, chunk=chunk)
    return best_rate(loader, len(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--latency-workers", type=int, default=16)
    args = parser.parse_args()
    files, targets, _ = list_image_folder(args.folder)
    test = ImageFiles(args.folder, files, targets, test_transform(args.size))
    whole, chunked = eval_rate(test, args.workers, 256), eval_rate(test, args.workers, 32)
    train = ImageFiles(args.folder, files, targets, train_transform(args.size))
    with tempfile.TemporaryDirectory() as cache:
        ready = DecodedImages(test, build(test, Path(cache), max(args.workers, 1), transformed=True))
        stored = eval_rate(ready, args.workers, 32)
        print(f"evaluation, {len(files)} images, {args.workers} workers: whole batches {whole:.0f} "
              f"img/s, 32-image chunks {chunked:.0f} img/s ({chunked / whole:.2f}x), stored test "
              f"tensors {stored:.0f} img/s ({stored / whole:.2f}x)")
        began = time.perf_counter()
        decoded = DecodedImages(train, build(train, Path(cache), max(args.workers, 1)))
        built = time.perf_counter() - began
        jpeg, cached = train_rate(train, args.workers), train_rate(decoded, args.workers)
    print(f"training, {len(files)} images, {args.workers} workers: JPEG {jpeg:.0f} img/s, "
          f"decoded cache {cached:.0f} img/s ({cached / jpeg:.2f}x; cache built once in {built:.1f}s)")
    rates = {(dtype, chunk): transport_rate(dtype, chunk, args.workers, args.size)
             for dtype in (torch.float32, torch.uint8) for chunk in (32, None)}
    base = rates[torch.float32, 32]
    print(f"transport, training loader, {args.workers} workers, batch 128 of {args.size}px: " + ", ".join(
        f"{str(dtype).split('.')[1]} {'whole batches' if chunk is None else f'{chunk}-image chunks'} "
        f"{rate:.0f} img/s ({rate / base:.2f}x)" for (dtype, chunk), rate in rates.items()))
    n = args.latency_workers
    (first32, rate32), (first, rate) = (first_batch_rates(split, n, args.size) for split in (False, True))
    print(f"first batch, 1200-image evaluation, {n} workers at 120 img/s each: all in {CHUNK}-image "
          f"chunks {first32:.2f}s to the first batch, {rate32:.0f} img/s; first batch in "
          f"{loaders.first_chunk(256, n)}-image chunks {first:.2f}s, {rate:.0f} img/s ({rate / rate32:.2f}x)")


if __name__ == "__main__":
    main()
