"""Measuring tools shared by every ``clbench perf`` section: device syncs, medians, per-iteration
timing inside a strategy, peak memory, numeric precision, and the environment of a measurement."""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import threading
import time

import torch

from clbench.distributed import all_cores
from clbench.precision import PRECISIONS, autocast


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


def timed(fn, device) -> float:
    """Seconds of one call of ``fn`` with the device idle before and after."""
    sync(device)
    began = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - began


def default_precisions(device) -> list[str]:
    """What ``clbench run`` uses by default: bf16 autocast on CUDA, fp32 on CPU."""
    return ["bf16"] if device.type == "cuda" else ["fp32"]


def _tf32_switches():
    """(object, attribute, on, off) for cuBLAS matmuls and cuDNN convolutions: the
    ``fp32_precision`` API where torch has it (reading the legacy ``allow_tf32`` after the new API
    was used raises), else ``allow_tf32``."""
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    try:
        matmul.fp32_precision, conv.fp32_precision  # noqa: B018 (probe)
        return [(matmul, "fp32_precision", "tf32", "ieee"), (conv, "fp32_precision", "tf32", "ieee")]
    except (AttributeError, RuntimeError):
        return [(matmul, "allow_tf32", True, False), (torch.backends.cudnn, "allow_tf32", True, False)]


@contextlib.contextmanager
def precision(name: str, device):
    """Run a block the way ``clbench run --precision name`` runs training: bf16 autocast, TF32
    matmuls/convolutions, or plain fp32 (TF32 off, PyTorch's default)."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}")
    switches = _tf32_switches()
    saved = [getattr(obj, attr) for obj, attr, _, _ in switches]
    for obj, attr, on, off in switches:
        setattr(obj, attr, on if name == "tf32" else off)
    try:
        with autocast(name, device):
            yield
    finally:
        for (obj, attr, _, _), value in zip(switches, saved):
            setattr(obj, attr, value)


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled RSS increase on CPU."""

    def __init__(self, device):
        self.device = device
        self.peak_mib = None
        self.kind = ("cuda max_memory_allocated" if device.type == "cuda"
                     else "CPU peak RSS increase (psutil, 5 ms sampling)")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _trim_heap()
        try:
            import psutil
        except ImportError:
            import resource

            self.kind = "CPU ru_maxrss increase (only growth above the process's earlier peak)"
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self._thread = None
            return self
        process = psutil.Process()
        self._start = process.memory_info().rss
        self._max = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self._max = max(self._max, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is None:
            import resource

            self.peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._start) / 1024
        else:
            self._stop.set()
            self._thread.join()
            import psutil

            self._max = max(self._max, psutil.Process().memory_info().rss)
            self.peak_mib = (self._max - self._start) / 2**20
        return False


def _trim_heap() -> None:
    """Return freed heap pages to the OS so a CPU RSS baseline is not inflated by earlier runs."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def environment(device) -> dict:
    from clbench.runner import environment as run_environment

    info = run_environment()
    info.update(device=str(device), threads=torch.get_num_threads(), platform=platform.platform(),
                cores=all_cores(),
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
