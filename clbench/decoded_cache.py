"""A decoded-image cache: each JPEG is decoded once into a flat uint8 file, later epochs and runs
read the pixels instead of decoding them (``clbench run --decoded-cache``).

The cached pixels are exactly what ``PIL.Image.open(f).convert("RGB")`` gives, and the dataset
hands the same transforms (RandomResizedCrop on the original image, flip, ...) a PIL image made
from them, so every sample is bit-identical to the JPEG path for the same random state: the
augmentation distribution is untouched, only the decode cost goes. The price is disk (width ×
height × 3 bytes per image, in the data root's ``.decoded/`` folder, keyed by the split's file
list) and one decoding pass, done with all cores the first time.

A fixed transform (the test transform: Resize, CenterCrop, PILToTensor) is applied once too: its
output is what gets stored, so an evaluation reads ready uint8 tensors (3 × S × S bytes each) and
does no image work at all; so does the class-statistics pass, which reads the training images
under the test transform (``SplitData.statistics``, a second, smaller cache of the training set).
Any random step keeps the image stored as decoded pixels.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from clbench.datasets import ImageFiles
from clbench.errors import UsageError


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size  # header only: no decoding


def fixed_uint8(transform) -> bool:
    """Whether ``transform`` is a fixed function of the image giving a uint8 tensor of one size
    (Resize, CenterCrop, PILToTensor): then its output can be stored instead of the pixels."""
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", [transform])
    return (all(isinstance(t, (T.Resize, T.CenterCrop, T.PILToTensor)) for t in steps)
            and any(isinstance(t, T.CenterCrop) for t in steps)
            and isinstance(steps[-1], T.PILToTensor))


def _stored(path: Path, transform) -> np.ndarray:
    """What the cache holds for one image: its RGB pixels (H×W×3), or ``transform``'s output."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if transform is None:
        return np.asarray(rgb, dtype=np.uint8)
    return transform(rgb).numpy()


def _decode(job) -> None:
    path, transform, pixels_file, offset, shape = job
    stored = _stored(path, transform)
    if list(stored.shape) != shape:
        raise RuntimeError(f"decoded cache: {path} gave shape {list(stored.shape)}, not {shape}")
    pixels = np.memmap(pixels_file, dtype=np.uint8, mode="r+", offset=offset,
                       shape=(stored.size,))
    pixels[:] = stored.reshape(-1)
    pixels.flush()


def _key(images: ImageFiles, transform) -> str:
    digest = hashlib.sha256(str(images.root.resolve()).encode())
    for name in images.files:
        digest.update(name.encode() + b"\0")
    if transform is not None:
        digest.update(b"transformed\0" + repr(transform).encode())
    return digest.hexdigest()[:16]


PARTIAL = ".partial-"  # + <key>-<host>-<pid>: a build in progress (renamed to <key> when done)
_HOST = socket.gethostname().replace("/", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:  # pid out of range and the like: not a process of this machine
        return False
    return True


def _owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a ``.partial-<key>-<host>-<pid>`` folder name; the host is ``_HOST`` for the
    older ``.partial-<key>-<pid>`` names, which were only ever written on this machine's disk by
    single-machine builds. ``None`` for a name that is not a partial build."""
    if not name.startswith(PARTIAL):
        return None
    rest = name[len(PARTIAL):]
    key, sep, owner = rest.partition("-")
    host, _, pid = owner.rpartition("-")
    if not (sep and key and pid.isdigit()):
        return None
    return host or _HOST, int(pid)


def remove_abandoned_partials(folder: Path) -> list[Path]:
    """Delete the half-written builds (``.partial-*``) of processes of this host that no longer
    run (killed mid-build: gigabytes on ImageNet-R); a live process's build, or another host's
    on a shared disk, is left alone. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no cache folder yet
        return removed
    for entry in entries:
        owner = _owner(entry.name)
        if owner is None or not entry.is_dir(follow_symlinks=False):
            continue
        host, pid = owner
        if host == _HOST and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def build(images: ImageFiles, folder: Path, processes: int, transformed: bool = False) -> Path:
    """Decode every image of ``images`` into ``folder/<key>/`` (once); returns that folder. With
    ``transformed``, store the output of the images' own (fixed) transform instead. The pixels
    are written under ``folder/.partial-<key>-<host>-<pid>/`` and renamed when complete; a build
    killed midway leaves that folder, which the next build removes (its process is gone), and is
    simply done again by rerunning the same command."""
    transform = images.transform if transformed else None
    target = folder / _key(images, transform)
    if (target / "index.json").exists():
        return target
    remove_abandoned_partials(folder)
    partial = folder / f"{PARTIAL}{target.name}-{_HOST}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
    except OSError as exc:  # checked up front by the plan; a folder can still turn read-only
        raise UsageError(f"--decoded-cache: cannot write to {folder} "
                         f"({exc.strerror or type(exc).__name__}); make it writable, or run "
                         "without --decoded-cache") from None
    paths = [images.root / name for name in images.files]
    with Pool(processes) as pool:
        if transform is None:
            shapes = [[h, w, 3] for w, h in pool.map(_size, paths, chunksize=64)]
        else:  # one output size for every image (CenterCrop)
            shapes = [list(_stored(paths[0], transform).shape)] * len(paths) if paths else []
        n_bytes = [int(np.prod(shape)) for shape in shapes]
        offsets = np.concatenate([[0], np.cumsum(n_bytes)[:-1]]).astype(np.int64).tolist()
        pixels_file = partial / "pixels.u8"
        np.memmap(pixels_file, dtype=np.uint8, mode="w+", shape=(max(sum(n_bytes), 1),)).flush()
        jobs = [(p, transform, pixels_file, o, shape)
                for p, o, shape in zip(paths, offsets, shapes)]
        for _ in pool.imap_unordered(_decode, jobs, chunksize=16):
            pass
    index = {"root": str(images.root), "files": len(paths), "offsets": offsets,
             "shapes": shapes, "transformed": transform is not None}
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
        self.transformed = index.get("transformed", False)
        self.offsets, self.shapes = index["offsets"], index["shapes"]
        self.pixels_file = cache / "pixels.u8"
        self._pixels = None  # opened lazily in each loader worker (a memmap must not be pickled)

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self):
        return {**self.__dict__, "_pixels": None}

    def _array(self, index: int) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.memmap(self.pixels_file, dtype=np.uint8, mode="r")
        shape = self.shapes[index]
        start = self.offsets[index]
        return np.array(self._pixels[start:start + int(np.prod(shape))]).reshape(shape)

    def __getitem__(self, index: int):
        if self.transformed:  # the transform's output itself
            return torch.from_numpy(self._array(index)), self.targets[index]
        from PIL import Image

        return self.transform(Image.fromarray(self._array(index))), self.targets[index]


def attach(split, folder: Path, processes: int, log=print):
    """Serve every ``ImageFiles`` part of ``split`` from the decoded cache under ``folder``."""
    parts = {name: getattr(split, name) for name in ("train", "test", "statistics")}
    if not any(isinstance(part, ImageFiles) for part in parts.values()):
        log("--decoded-cache: this benchmark's images are already decoded in memory; nothing to do")
        return split
    for name, part in parts.items():
        if isinstance(part, ImageFiles):
            transformed = fixed_uint8(part.transform)
            log(f"decoded cache ({name}{', after its fixed transform' if transformed else ''}): "
                f"{folder}")
            setattr(split, name, DecodedImages(part, build(part, folder, processes, transformed)))
    return split
