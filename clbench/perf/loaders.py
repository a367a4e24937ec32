"""Data-loader throughput: the training/test DataLoaders built as the core builds them, with the
worker count a user would pass (all cores), over digits and an ImageNet-R-shaped JPEG tree read by
ImageNet-R's loading code. Section 4 puts them next to the model's own images/s."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from clbench.perf import jpeg_tree
from clbench.perf.setup import Shapes, digits_stream


def loader_rate(dataset, batch: int, workers: int, device, epochs: int = 1,
                shuffle: bool = True) -> float:
    """Images/s of a DataLoader (persistent workers, pinned memory on CUDA), counted from the
    first batch on: worker start-up is not throughput."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=shuffle, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0))
    began, n, epoch = None, 0, 0
    while epoch < epochs or (n == 0 and epoch < epochs + 2):  # at least one batch after the first
        for batch_data in loader:
            if began is None:
                began = time.perf_counter()
                continue
            n += len(batch_data[0])
        epoch += 1
    return n / (time.perf_counter() - began) if n else float("nan")


def tree_loader_rates(root: Path, image_size: int, batch: int, workers: int, device,
                      train_epochs: int = 1, test_epochs: int = 3,
                      decoded_cache: Path | None = None) -> dict:
    """Train (RandomResizedCrop + flip) and test (Resize + CenterCrop) images/s over a JPEG tree;
    with ``decoded_cache``, over its decoded pixels (what ``clbench run --decoded-cache`` reads;
    building the cache, once, is timed apart)."""
    from clbench.presplit import load_presplit

    split = load_presplit(jpeg_tree.split_root(root), "perf-tree", image_size)
    built_s = None
    if decoded_cache is not None:
        from clbench import decoded_cache as cache

        began = time.perf_counter()
        split = cache.attach(split, decoded_cache, max(workers, 1), log=lambda _: None)
        built_s = time.perf_counter() - began
    return {"workers": workers, "batch": batch, "input_size": image_size,
            "source": "decoded cache" if decoded_cache is not None else "JPEG",
            "decoded_cache_build_s": built_s,
            "train_images": len(split.train), "test_images": len(split.test),
            "train_images_per_s": loader_rate(split.train, batch, workers, device, train_epochs),
            "test_images_per_s": loader_rate(split.test, batch, workers, device, test_epochs,
                                             shuffle=False)}


def measure_loaders(shapes: Shapes, device, model_train_ips: float, model_precision: str,
                    workers: int, quick: bool, log) -> dict:
    """Section 4: loader images/s with ``workers`` workers vs the model's training images/s (at
    the run's default precision: bf16 on CUDA)."""
    results = {}
    _, stream = digits_stream(16)
    results["digits"] = {
        "input_size": 16, "workers": workers,
        "loader_images_per_s": loader_rate(stream.train[0].dataset, shapes.batch, workers, device,
                                           epochs=3),
        "model_train_images_per_s": model_train_ips if shapes.name == "tiny" else None}
    spec = jpeg_tree.TreeSpec(classes=4, train_per_class=8 if quick else 32,
                              test_per_class=8 if quick else 32, side=448)
    with tempfile.TemporaryDirectory(prefix="clbench-perf-") as tmp:
        jpeg_tree.generate(Path(tmp), spec)
        rates = tree_loader_rates(Path(tmp), 224, shapes.batch, workers, device,
                                  train_epochs=1 if quick else 2, test_epochs=1 if quick else 3)
    results["imagenet-r-tree"] = {
        **rates, "jpeg_side": spec.side,
        "model_train_images_per_s": model_train_ips if shapes.name == "vit-b16" else None,
        "model_precision": model_precision,
        "note": None if shapes.name == "vit-b16" else
        "compare with the ViT-B/16 rate of `clbench perf --shapes vit-b16` or `--sections e2e`"}
    log(f"  loaders: {workers} workers")
    return results
