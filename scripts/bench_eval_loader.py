"""Evaluation loading, side by side: whole 256-image batches per worker (one DataLoader request
per batch) vs the same batches decoded in 32-image chunks (``clbench.loaders.Rebatched``).

    python scripts/bench_eval_loader.py <imagenet-r>/test [--workers N] [--size 224]

Prints images/s of a full pass over the folder (best of three after a warm-up) for both, and the
ratio. Any ImageFolder-style tree works, e.g. the one ``clbench perf --sections e2e
--e2e-data DIR`` writes.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from clbench.datasets import ImageFiles, list_image_folder, test_transform
from clbench.evaluation import _SeenBatches
from clbench.loaders import Rebatched


def rate(data, workers: int, chunk: int, batch: int = 256) -> float:
    sampler = _SeenBatches([len(data)], batch)
    sampler.n_seen = 1
    loader = Rebatched(data, sampler, workers, pin_memory=False, chunk=chunk)
    times = []
    for _ in range(4):
        began = time.perf_counter()
        for _batch in loader:
            pass
        times.append(time.perf_counter() - began)
    return len(data) / min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    files, targets, _ = list_image_folder(args.folder)
    data = ImageFiles(args.folder, files, targets, test_transform(args.size))
    whole, chunked = rate(data, args.workers, 256), rate(data, args.workers, 32)
    print(f"{len(data)} images, {args.workers} workers: whole batches {whole:.0f} img/s, "
          f"32-image chunks {chunked:.0f} img/s ({chunked / whole:.2f}x)")


if __name__ == "__main__":
    main()
