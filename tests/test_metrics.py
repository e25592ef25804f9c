"""Metrics on a 3-task example worked out by hand (values in the comments)."""

import numpy as np
import pytest

from calfuse_jax import metrics

# 3 tasks of 2 classes; tasks have 4, 2 and 4 test images, so the seen-class accuracy (image
# weighted) differs from the plain row mean of A.
BOUNDS = [0, 2, 4, 6]
LABELS = np.array([0, 0, 1, 1, 2, 3, 4, 4, 5, 5])
PREDICTIONS = [
    # after task 0: task 0 right 3/4 = 75; seen = 3/4 = 75 (unseen images are ignored)
    np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 0]),
    # after task 1: task 0 2/4 = 50, task 1 2/2 = 100; seen = 4/6 = 66.67
    np.array([0, 1, 1, 0, 2, 3, 0, 0, 0, 0]),
    # after task 2: task 0 3/4 = 75, task 1 1/2 = 50, task 2 3/4 = 75; seen = 7/10 = 70
    np.array([0, 0, 0, 1, 3, 3, 4, 4, 5, 2]),
]
NAN = np.nan
A_HAND = np.array([[75.0, NAN, NAN], [50.0, 100.0, NAN], [75.0, 50.0, 75.0]])
SEEN_HAND = np.array([75.0, 400 / 6, 70.0])


def test_accuracy_matrix_by_hand():
    a, seen = metrics.accuracy_matrix(PREDICTIONS, LABELS, BOUNDS)
    np.testing.assert_array_equal(a, A_HAND)  # NaN positions equal too
    np.testing.assert_array_equal(seen, SEEN_HAND)
    partial, partial_seen = metrics.accuracy_matrix(PREDICTIONS[:1], LABELS, BOUNDS)
    assert (
        partial[0, 0] == 75.0 and np.isnan(partial[1:]).all() and np.isnan(partial_seen[1:]).all()
    )


def test_summary_metrics_by_hand():
    # Avg = (75 + 66.67 + 70) / 3 = 635 / 9; Last = 70.
    assert metrics.average_accuracy(SEEN_HAND) == pytest.approx(635 / 9, rel=1e-15)
    assert metrics.last_accuracy(SEEN_HAND) == 70.0
    # From A with the task sizes (4, 2, 4): same numbers.
    np.testing.assert_allclose(metrics.seen_accuracies(A_HAND, [4, 2, 4]), SEEN_HAND, rtol=1e-15)
    assert metrics.average_accuracy(A_HAND, task_sizes=[4, 2, 4]) == pytest.approx(635 / 9)
    with pytest.raises(ValueError, match="seen-class accuracies"):
        metrics.average_accuracy(A_HAND)
    # Forgetting: task 0 max(75, 50) - 75 = 0, task 1 100 - 50 = 50 -> 25.
    assert metrics.forgetting(A_HAND) == 25.0
    # BWT: ((75 - 75) + (50 - 100)) / 2 = -25.
    assert metrics.backward_transfer(A_HAND) == -25.0
    # After task 1 only: forgetting of task 0 = 75 - 50 = 25, BWT = -25.
    assert metrics.forgetting(A_HAND[:2, :2]) == 25.0
    assert metrics.backward_transfer(A_HAND[:2, :2]) == -25.0
    assert np.isnan(metrics.forgetting(A_HAND[:1, :1]))


def test_old_new_and_harmonic_mean_by_hand():
    # After task 2: old = positions < 4 -> 4/6 right = 66.67; new = positions 4, 5 -> 3/4 = 75.
    old, new = metrics.old_new_accuracy(PREDICTIONS[2], LABELS, num_old=4, num_seen=6)
    assert old == pytest.approx(400 / 6, rel=1e-15) and new == 75.0
    # H = 2 * (200/3) * 75 / (200/3 + 75) = 1200 / 17.
    assert metrics.harmonic_mean(old, new) == pytest.approx(1200 / 17, rel=1e-15)
    assert metrics.harmonic_mean(0.0, 0.0) == 0.0
    first_old, _ = metrics.old_new_accuracy(PREDICTIONS[0], LABELS, num_old=0, num_seen=2)
    assert np.isnan(first_old)
