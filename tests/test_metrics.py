"""Metrics against hand-computed matrices."""
import pytest

from clbench import metrics

# Three tasks with unequal test sets (10, 30, 20 samples): pooled and task-mean accuracy differ.
CORRECT = [[9], [6, 27], [5, 24, 10]]
TOTAL = [[10], [10, 30], [10, 30, 20]]


def test_accuracy_matrix_by_hand():
    assert metrics.accuracy_matrix(CORRECT, TOTAL) == [
        [90.0], [60.0, 90.0], [50.0, 80.0, 50.0]]


def test_final_accuracy_is_pooled_over_samples():
    # (5 + 24 + 10) / (10 + 30 + 20) = 39 / 60
    assert metrics.final_accuracy(CORRECT, TOTAL) == pytest.approx(65.0)


def test_final_task_mean_differs_from_pooled():
    # (50 + 80 + 50) / 3
    assert metrics.final_task_mean_accuracy(CORRECT, TOTAL) == pytest.approx(60.0)


def test_average_incremental_accuracy():
    # after task 0: 9/10 = 90; after task 1: 33/40 = 82.5; after task 2: 39/60 = 65
    assert metrics.accuracy_curve(CORRECT, TOTAL) == pytest.approx([90.0, 82.5, 65.0])
    assert metrics.average_incremental_accuracy(CORRECT, TOTAL) == pytest.approx((90 + 82.5 + 65) / 3)


def test_forgetting_uses_best_accuracy_before_last_task():
    # task 0: max(90, 60) - 50 = 40; task 1: max(90) - 80 = 10 → mean 25
    assert metrics.forgetting(CORRECT, TOTAL) == pytest.approx(25.0)


def test_backward_transfer():
    # task 0: 50 - 90 = -40; task 1: 80 - 90 = -10 → mean -25
    assert metrics.backward_transfer(CORRECT, TOTAL) == pytest.approx(-25.0)


def test_forgetting_differs_from_negative_bwt_when_accuracy_peaks_later():
    correct = [[5], [9, 9], [7, 9, 9]]
    total = [[10], [10, 10], [10, 10, 10]]
    # task 0 peaks at 90 after task 1: forgetting (90-70 + 90-90)/2 = 10; bwt (70-50 + 90-90)/2 = 10
    assert metrics.forgetting(correct, total) == pytest.approx(10.0)
    assert metrics.backward_transfer(correct, total) == pytest.approx(10.0)


def test_single_task_has_no_forgetting():
    assert metrics.summarize([[3]], [[4]]) == {
        "final_acc": 75.0, "avg_inc_acc": 75.0, "forgetting": 0.0, "bwt": 0.0,
        "final_task_mean_acc": 75.0}


# A task that ends better than it ever was before (task 0: 50 → 60 → 80), one that recovers
# (task 1: 90 → 70 → 80): the published forgetting definitions disagree here.
RECOVER_C = [[5], [6, 9], [8, 7, 9]]
RECOVER_T = [[10], [10, 10], [10, 10, 10]]


def test_forgetting_definitions_differ_as_documented():
    # Chaudhry (clbench): task 0: max(50, 60) - 80 = -20; task 1: max(90) - 70 = 20 → 0
    assert metrics.forgetting(RECOVER_C, RECOVER_T) == pytest.approx(0.0)
    # official SD-LoRA trainer: max includes the final row → task 0: 80 - 80 = 0; task 1: 20 → 10
    assert metrics.forgetting_max_incl_final(RECOVER_C, RECOVER_T) == pytest.approx(10.0)
    # CODA F_N: t=1: (50-60)/1 = -10; t=2: ((60-80) + (90-70))/2 = 0 → (-10 + 0) / 2 = -5
    assert metrics.forgetting_coda(RECOVER_C, RECOVER_T) == pytest.approx(-5.0)
    # Avalanche's forgetting is acc[j][j] - acc[T-1][j] = -BWT: ((50-80) + (90-70)) / 2 = -5
    assert -metrics.backward_transfer(RECOVER_C, RECOVER_T) == pytest.approx(-5.0)


def test_forgetting_definitions_agree_when_accuracy_only_falls():
    # CORRECT/TOTAL: every old task only loses accuracy after it was learned
    ours = metrics.forgetting(CORRECT, TOTAL)
    assert metrics.forgetting_max_incl_final(CORRECT, TOTAL) == pytest.approx(ours)
    assert -metrics.backward_transfer(CORRECT, TOTAL) == pytest.approx(ours)
