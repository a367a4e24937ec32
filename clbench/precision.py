"""Numeric precision of a run (``--precision``).

``bf16``: forward passes under bfloat16 autocast (the default on CUDA); ``tf32``: float32 with
TF32 matrix multiplies; ``fp32``: plain float32 (the default on CPU, and what the tests pin).
Exact maths (norms and cosines, SVDs, least squares, statistics, merged weights) runs inside
``exact(device)``, the one way clbench and the methods leave an autocast forward; a region that
needs float32/float64 casts its inputs itself.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("bf16", "tf32", "fp32")


def default_for(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


def configure(precision: str) -> None:
    """Process-wide matmul settings for the chosen precision (TF32 only when asked for)."""
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def exact(device: torch.device | str):
    """Autocast off on ``device``'s type: the region runs in its inputs' own dtypes even inside
    a bf16 forward (it does not cast them)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)
