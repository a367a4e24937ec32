"""Continual-learning metrics as pure functions of the per-task correct/total counts.

``correct[i][j]`` and ``total[i][j]`` count the test samples of task ``j`` evaluated right
after training task ``i`` (defined for ``j <= i``). Keeping counts, not accuracies, makes every
metric exact and lets pooled (sample-weighted) and task-mean accuracies differ where test sets
are unbalanced, as they are on ImageNet-R.
"""
from __future__ import annotations

from typing import Sequence

Counts = Sequence[Sequence[int]]


def accuracy_matrix(correct: Counts, total: Counts) -> list[list[float]]:
    """Per-task accuracy in percent: ``acc[i][j]`` for ``j <= i``."""
    return [[100.0 * c / t for c, t in zip(row_c[: i + 1], row_t[: i + 1])]
            for i, (row_c, row_t) in enumerate(zip(correct, total))]


def pooled_accuracy(correct_row: Sequence[int], total_row: Sequence[int]) -> float:
    """Accuracy over all test samples of the tasks in the row (what the SD-LoRA code reports)."""
    return 100.0 * sum(correct_row) / sum(total_row)


def accuracy_curve(correct: Counts, total: Counts) -> list[float]:
    """Pooled accuracy on all seen tasks right after each task."""
    return [pooled_accuracy(correct[i][: i + 1], total[i][: i + 1]) for i in range(len(correct))]


def final_accuracy(correct: Counts, total: Counts) -> float:
    last = len(correct) - 1
    return pooled_accuracy(correct[last][: last + 1], total[last][: last + 1])


def average_incremental_accuracy(correct: Counts, total: Counts) -> float:
    """Mean over tasks of the pooled accuracy on tasks seen so far (AAA / A_avg)."""
    curve = accuracy_curve(correct, total)
    return sum(curve) / len(curve)


def final_task_mean_accuracy(correct: Counts, total: Counts) -> float:
    """Mean of the per-task accuracies after the last task (L2P's "average accuracy")."""
    last_row = accuracy_matrix(correct, total)[-1]
    return sum(last_row) / len(last_row)


def per_task_forgetting(acc: Sequence[Sequence[float]]) -> list[float]:
    """``max_{j <= i <= T-2} acc[i][j] − acc[T-1][j]`` for every task ``j < T-1``."""
    n = len(acc)
    return [max(acc[i][j] for i in range(j, n - 1)) - acc[n - 1][j] for j in range(n - 1)]


def forgetting(correct: Counts, total: Counts) -> float:
    """Mean over earlier tasks of (best accuracy before the last task − final accuracy).

    This is Chaudhry et al.'s forgetting (ECCV 2018, "Riemannian Walk"): for every task
    ``j < T-1``, ``max_{j <= i <= T-2} acc[i][j] − acc[T-1][j]``, averaged over the ``T-1`` tasks;
    a task that ends better than it ever was counts negative. Papers and codes that report a
    "forgetting" mean other things; compare like with like:

    * **official SD-LoRA trainer** (``trainer.py``, "Forgetting (CNN)"): the max runs over
      *every* row, the final one included, so each task's term is ``>= 0`` and the mean is never
      negative (:func:`forgetting_max_incl_final`); its accuracies are per class-range group.
    * **CODA-Prompt's F_N** (``utils/calc_forgetting.py``): consecutive drops,
      ``1/(T-1) · Σ_{t=1}^{T-1} (1/t) Σ_{j<t} (acc[t-1][j] − acc[t][j])``, assuming equal tasks
      (:func:`forgetting_coda`); recoveries cancel drops and early steps weigh more.
    * **Avalanche's** ``StreamForgetting`` / ``ExperienceForgetting``: accuracy right after
      training a task minus its current accuracy, ``acc[j][j] − acc[T-1][j]``, i.e. exactly
      ``−BWT`` (:func:`backward_transfer`), as a fraction rather than percent.

    All coincide when accuracy on every old task only ever falls after it was learned.
    """
    drops = per_task_forgetting(accuracy_matrix(correct, total))
    return sum(drops) / len(drops) if drops else 0.0


def forgetting_max_incl_final(correct: Counts, total: Counts) -> float:
    """The official SD-LoRA trainer's forgetting: ``max_{i >= j} acc[i][j] − acc[T-1][j]`` (final
    row included in the max, so never negative), mean over ``j < T-1``. For comparison only."""
    acc = accuracy_matrix(correct, total)
    n = len(acc)
    if n < 2:
        return 0.0
    return sum(max(acc[i][j] for i in range(j, n)) - acc[n - 1][j] for j in range(n - 1)) / (n - 1)


def forgetting_coda(correct: Counts, total: Counts) -> float:
    """CODA-Prompt's F_N: mean over steps t >= 1 of the average drop on tasks ``j < t`` between
    rows ``t-1`` and ``t``. For comparison only."""
    acc = accuracy_matrix(correct, total)
    n = len(acc)
    if n < 2:
        return 0.0
    return sum(sum(acc[t - 1][j] - acc[t][j] for j in range(t)) / t for t in range(1, n)) / (n - 1)


def backward_transfer(correct: Counts, total: Counts) -> float:
    """Mean over earlier tasks of (final accuracy − accuracy right after learning the task)."""
    acc = accuracy_matrix(correct, total)
    n = len(acc)
    if n < 2:
        return 0.0
    return sum(acc[n - 1][j] - acc[j][j] for j in range(n - 1)) / (n - 1)


def summarize(correct: Counts, total: Counts) -> dict[str, float]:
    """Every headline metric, in percent, keyed as in ``results.json``."""
    return {
        "final_acc": final_accuracy(correct, total),
        "avg_inc_acc": average_incremental_accuracy(correct, total),
        "forgetting": forgetting(correct, total),
        "bwt": backward_transfer(correct, total),
        "final_task_mean_acc": final_task_mean_accuracy(correct, total),
    }
