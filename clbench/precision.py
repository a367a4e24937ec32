"""Numeric precision of a run (``--precision``).

``bf16``: forward passes under bfloat16 autocast (the default on CUDA); ``tf32``: float32 with
TF32 matrix multiplies; ``fp32``: plain float32 (the default on CPU, and what the tests pin).
Exact maths stays out of autocast in the methods (norms, SVDs, least squares, statistics).
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
    """A region computed in full precision even inside an autocast forward."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)
