"""The official per-epoch cosine of InfLoRA / CODA-Prompt (used by inflora, coda-prompt, l2p-pp).

The expected sequences were obtained by running the official ``CosineSchedule`` class
(``utils/schedulers.py``, identical in liangyanshuo/InfLoRA and GT-RIPL/CODA-Prompt) from a
scratch copy with each official loop's call pattern, reading ``param_groups[0]["lr"]`` while each
epoch trains (base lr 1.0):

* InfLoRA ``methods/inflora.py`` ``train_function``: train the epoch, then ``scheduler.step()``;
* CODA-Prompt ``learners/default.py`` ``learn_batch``: ``if epoch > 0: scheduler.step()``, then train.

Both loops gave the same sequences, bit for bit equal to
lr·cos(99π·max(e−1, 0) / (200·(K−1))) for K in {2, 3, 5, 10, 20, 50}; K = 1 raises
ZeroDivisionError in the official class.
"""
from __future__ import annotations

import math

import pytest
import torch

from clbench.schedules import cosine_per_epoch

# repr() of the official class's lrs, K = 5 and K = 3 (base lr 1.0)
OFFICIAL_K5 = [1.0, 1.0, 0.9253751992908621, 0.7126385189252054, 0.3935408236546514]
OFFICIAL_K3 = [1.0, 1.0, 0.7126385189252054]
OFFICIAL_K50_HEAD = [1.0, 1.0, 0.999496439640115, 0.9979862657065323, 0.9954709991267106]
OFFICIAL_K50_LAST = 0.04742666308909818
OFFICIAL_K20_LAST = 0.0974000560613835


def epoch_lrs(epochs: int, base: float = 1.0) -> list[float]:
    """The lr each epoch trains at, stepping as the harness does (after every epoch)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched, lrs = cosine_per_epoch(opt, epochs), []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_matches_the_official_class_bit_for_bit():
    assert epoch_lrs(5) == OFFICIAL_K5
    assert epoch_lrs(3) == OFFICIAL_K3
    lrs = epoch_lrs(50)
    assert lrs[:5] == OFFICIAL_K50_HEAD and lrs[-1] == OFFICIAL_K50_LAST
    assert epoch_lrs(20)[-1] == OFFICIAL_K20_LAST
    assert epoch_lrs(2) == [1.0, 1.0]


@pytest.mark.parametrize("epochs", [2, 4, 7, 20, 50])
def test_first_two_epochs_at_full_lr_then_the_official_formula(epochs):
    lrs = epoch_lrs(epochs, base=5e-4)
    assert lrs[0] == lrs[1] == 5e-4
    expected = [5e-4 * math.cos(99 * math.pi * max(e - 1, 0) / (200 * (epochs - 1))) for e in range(epochs)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert all(a >= b > 0 for a, b in zip(lrs, lrs[1:]))


def test_one_epoch_keeps_the_lr():
    assert epoch_lrs(1, base=0.3) == [0.3]
