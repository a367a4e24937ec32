"""Atomic files: nothing already computed is lost when a run is killed mid-write."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from clbench.errors import UsageError


TEMPORARY_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results honour the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    """Atomic JSON write; an unwritable place is a one-line usage error naming it."""
    try:
        _atomic(Path(path), lambda h: h.write(json.dumps(data, indent=2, sort_keys=False).encode()))
    except OSError as exc:
        raise UsageError(f"cannot write {path} ({exc.strerror or type(exc).__name__}); "
                         "choose a writable --out") from None


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    import torch

    _atomic(Path(path), lambda h: torch.save(checkpoint, h))


def load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def clean_temporary_files(folder: Path) -> None:
    """Remove half-written files a killed run left behind (never a finished file)."""
    if Path(folder).is_dir():
        for leftover in Path(folder).glob(f"{TEMPORARY_PREFIX}*"):
            leftover.unlink(missing_ok=True)
