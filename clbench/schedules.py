"""Learning-rate schedules of the official codes, shared by several methods."""
from __future__ import annotations

import math

import torch


def cosine_per_epoch(optimizer, epochs: int):
    """The per-epoch cosine of the CODA-Prompt / InfLoRA codes (utils/schedulers.py
    ``CosineSchedule``): epoch e of K trains at lr·cos(99π·e / (200·(K−1))), i.e. from lr down to
    ≈0.016·lr in the last epoch (never 0); K = 1 keeps lr."""
    def factor(epoch: int) -> float:
        return math.cos(99 * math.pi * epoch / (200 * (epochs - 1))) if epochs > 1 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
