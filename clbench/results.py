"""Atomic files: nothing already computed is lost when a run is killed mid-write."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    _atomic(Path(path), lambda h: h.write(json.dumps(data, indent=2, sort_keys=False).encode()))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    import torch

    _atomic(Path(path), lambda h: torch.save(checkpoint, h))


def load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
