"""Learning-rate schedules of the official codes, shared by several methods."""
from __future__ import annotations

import math

import torch


def cosine_factor(epoch: int, epochs: int) -> float:
    """The lr factor of 0-based ``epoch`` of ``epochs`` under the official ``CosineSchedule``."""
    if epochs <= 1:
        return 1.0
    return math.cos(99 * math.pi * max(epoch - 1, 0) / (200 * (epochs - 1)))


def cosine_per_epoch(optimizer, epochs: int):
    """The per-epoch cosine of the CODA-Prompt / InfLoRA codes (``utils/schedulers.py``
    ``CosineSchedule``, stepped once per epoch as their loops do).

    Their scheduler applies cos(0) in its constructor and then resets ``last_epoch`` to −1, so
    its first ``step()`` sets cos(0) again: epoch e of K trains at
    lr·cos(99π·max(e−1, 0) / (200·(K−1))) — the first two epochs at the full lr, the last at
    cos(99π(K−2)/(200(K−1))) (0.047 at K = 50, 0.39 at K = 5), never 0. Verified by running the
    official class under both loops (InfLoRA steps after each epoch, CODA-Prompt before each
    epoch but the first); see tests/test_schedules.py. K = 1 keeps lr (the official class divides
    by zero there)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: cosine_factor(epoch, epochs))
