"""A decoded-image cache: each JPEG is decoded once into a flat uint8 file, later epochs and runs
read the pixels instead of decoding them (``clbench run --decoded-cache``).

The cached pixels are exactly what ``PIL.Image.open(f).convert("RGB")`` gives, and the dataset
hands the same transforms (RandomResizedCrop on the original image, flip, ...) a PIL image made
from them, so every sample is bit-identical to the JPEG path for the same random state: the
augmentation distribution is untouched, only the decode cost goes. The price is disk (width ×
height × 3 bytes per image, in the data root's ``.decoded/`` folder, keyed by the split's file
list) and one decoding pass, done with all cores the first time.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from clbench.datasets import ImageFiles


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size  # header only: no decoding


def _decode(job) -> None:
    path, pixels_file, offset, n_bytes = job
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    pixels = np.memmap(pixels_file, dtype=np.uint8, mode="r+", offset=offset, shape=(n_bytes,))
    pixels[:] = rgb.reshape(-1)
    pixels.flush()


def _key(images: ImageFiles) -> str:
    digest = hashlib.sha256(str(images.root.resolve()).encode())
    for name in images.files:
        digest.update(name.encode() + b"\0")
    return digest.hexdigest()[:16]


def build(images: ImageFiles, folder: Path, processes: int) -> Path:
    """Decode every image of ``images`` into ``folder/<key>/`` (once); returns that folder."""
    target = folder / _key(images)
    if (target / "index.json").exists():
        return target
    partial = folder / f".partial-{target.name}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    paths = [images.root / name for name in images.files]
    with Pool(processes) as pool:
        sizes = pool.map(_size, paths, chunksize=64)
        n_bytes = [w * h * 3 for w, h in sizes]
        offsets = np.concatenate([[0], np.cumsum(n_bytes)[:-1]]).astype(np.int64).tolist()
        pixels_file = partial / "pixels.u8"
        np.memmap(pixels_file, dtype=np.uint8, mode="w+", shape=(max(sum(n_bytes), 1),)).flush()
        jobs = [(p, pixels_file, o, n) for p, o, n in zip(paths, offsets, n_bytes)]
        for _ in pool.imap_unordered(_decode, jobs, chunksize=16):
            pass
    index = {"root": str(images.root), "files": len(paths), "offsets": offsets,
             "shapes": [[h, w, 3] for w, h in sizes]}
    (partial / "index.json").write_text(json.dumps(index))
    try:
        partial.rename(target)  # complete or absent, never half-written
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return target


class DecodedImages:
    """``ImageFiles`` served from the decoded cache; same items, same transforms."""

    def __init__(self, images: ImageFiles, cache: Path):
        index = json.loads((cache / "index.json").read_text())
        if index["files"] != len(images.files):
            raise RuntimeError(f"decoded cache {cache} does not match its image list")
        self.targets, self.transform = images.targets, images.transform
        self.offsets, self.shapes = index["offsets"], index["shapes"]
        self.pixels_file = cache / "pixels.u8"
        self._pixels = None  # opened lazily in each loader worker (a memmap must not be pickled)

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self):
        return {**self.__dict__, "_pixels": None}

    def image(self, index: int):
        from PIL import Image

        if self._pixels is None:
            self._pixels = np.memmap(self.pixels_file, dtype=np.uint8, mode="r")
        shape = self.shapes[index]
        start = self.offsets[index]
        flat = self._pixels[start:start + shape[0] * shape[1] * 3]
        return Image.fromarray(np.asarray(flat).reshape(shape))  # H×W×3 uint8: RGB

    def __getitem__(self, index: int):
        return self.transform(self.image(index)), self.targets[index]


def attach(split, folder: Path, processes: int, log=print):
    """Serve every ``ImageFiles`` part of ``split`` from the decoded cache under ``folder``."""
    parts = {name: getattr(split, name) for name in ("train", "test")}
    if not any(isinstance(part, ImageFiles) for part in parts.values()):
        log("--decoded-cache: this benchmark's images are already decoded in memory; nothing to do")
        return split
    for name, part in parts.items():
        if isinstance(part, ImageFiles):
            log(f"decoded cache ({name}): {folder}")
            setattr(split, name, DecodedImages(part, build(part, folder, processes)))
    return split
