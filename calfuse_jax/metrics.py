"""Continual-learning metrics (DESIGN.md §3), in percent, on class *positions*.

`A[i, j]`: accuracy on task j's classes after training task i (NaN above the diagonal);
`seen[i]`: on all classes seen after task i, weighted by test images (not the row mean of A).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calfuse_jax.rundir import jsonable

if TYPE_CHECKING:
    from calfuse_jax.stats import ClassStats


def class_counts(preds, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct, total) float64 [C] per class position, from predicted and true positions [M]."""
    labels = np.asarray(labels)
    hits = (np.asarray(preds) == labels).astype(np.float64)
    correct = np.bincount(labels, weights=hits, minlength=num_classes)
    return correct, np.bincount(labels, minlength=num_classes).astype(np.float64)


def accuracy_of(correct, total, lo: int, hi: int) -> float:
    """`100 * correct / total` over class positions lo..hi-1; NaN with no samples."""
    n = total[lo:hi].sum()
    return float(100.0 * correct[lo:hi].sum() / n) if n else float("nan")


def count_row(correct, total, bounds: Sequence[int], task: int) -> np.ndarray:
    """Row `task` of A, float64 [T] (NaN for j > task), from the per-class counts after `task`."""
    row = np.full(len(bounds) - 1, np.nan)
    for j in range(task + 1):
        row[j] = accuracy_of(correct, total, int(bounds[j]), int(bounds[j + 1]))
    return row


def accuracy_matrix(predictions: Sequence, labels, bounds: Sequence[int]):
    """(A [T, T], seen [T]) from `predictions`, one array of predicted positions [M] per finished
    task, and the true positions `labels` [M]; `bounds` [T + 1] are the tasks' class boundaries
    (`TaskSplit.bounds`). Rows of tasks not yet evaluated are NaN."""
    num_tasks = len(bounds) - 1
    matrix, seen = np.full((num_tasks, num_tasks), np.nan), np.full(num_tasks, np.nan)
    for i, preds in enumerate(predictions):
        counts = class_counts(preds, labels, int(bounds[-1]))
        matrix[i], seen[i] = count_row(*counts, bounds, i), accuracy_of(*counts, 0, bounds[i + 1])
    return matrix, seen


def seen_accuracies(matrix, task_sizes) -> np.ndarray:
    """float64 [T] `seen[i] = sum_{j<=i} n_j A[i, j] / sum_{j<=i} n_j`, n_j: task j's images."""
    matrix, sizes = np.asarray(matrix, np.float64), np.asarray(task_sizes, np.float64)
    rows = range(matrix.shape[0])
    return np.array(
        [np.sum(sizes[: i + 1] * matrix[i, : i + 1]) / np.sum(sizes[: i + 1]) for i in rows]
    )


def _seen_vector(seen_or_matrix, task_sizes) -> np.ndarray:
    values = np.asarray(seen_or_matrix, np.float64)
    if values.ndim == 1:
        return values
    if values.ndim == 2 and task_sizes is not None:
        return seen_accuracies(values, task_sizes)
    raise ValueError(
        "pass the per-task seen-class accuracies [T], or A [T, T] with task_sizes (test images "
        "per task); the plain row mean of A is not the papers' Avg"
    )


def average_accuracy(seen_or_matrix, task_sizes=None) -> float:
    """Avg = `mean_i seen[i]`; pass seen [T], or A [T, T] with `task_sizes` [T]."""
    return float(np.mean(_seen_vector(seen_or_matrix, task_sizes)))


def last_accuracy(seen_or_matrix, task_sizes=None) -> float:
    """Last = `seen[T - 1]`, the seen-class accuracy after the final task."""
    return float(_seen_vector(seen_or_matrix, task_sizes)[-1])


def _mean_over_old_tasks(matrix, term) -> float:
    """mean over j < T-1 of `term(A, j, T-1)`; NaN when T = 1."""
    a = np.asarray(matrix, np.float64)
    last = a.shape[0] - 1
    return float(np.mean([term(a, j, last) for j in range(last)])) if last >= 1 else float("nan")


def forgetting(matrix) -> float:
    """`F = 1/(T-1) sum_{j<T-1} max_{j<=l<T-1} (A[l, j] - A[T-1, j])` (Chaudhry et al. 2018);
    NaN when T = 1."""
    return _mean_over_old_tasks(matrix, lambda a, j, last: np.max(a[j:last, j]) - a[last, j])


def backward_transfer(matrix) -> float:
    """BWT = `1/(T-1) sum_{j<T-1} (A[T-1, j] - A[j, j])` (Lopez-Paz & Ranzato 2017): negative
    means forgetting; NaN when T = 1."""
    return _mean_over_old_tasks(matrix, lambda a, j, last: a[last, j] - a[j, j])


def old_new_accuracy(preds, labels, num_old: int, num_seen: int) -> tuple[float, float]:
    """(old, new) accuracy on positions < num_old and num_old..num_seen-1; `preds` [M, C] or [M].
    Old is NaN when num_old is 0; either is NaN without test images of its classes."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.ndim == labels.ndim + 1:
        preds = np.argmax(preds, axis=-1)
    counts = class_counts(preds, labels, num_seen)
    return accuracy_of(*counts, 0, num_old), accuracy_of(*counts, num_old, num_seen)


def harmonic_mean(old: float, new: float) -> float:
    """H = `2 * old * new / (old + new)`; 0 when both are 0."""
    old, new = float(old), float(new)
    return 0.0 if old + new == 0 else 2.0 * old * new / (old + new)


@dataclasses.dataclass
class ContinualResult:
    """The outcome of `run_continual` (percentages; NaN where undefined)."""

    accuracy_matrix: np.ndarray  # float [T, T] A (NaN above the diagonal)
    seen_accuracy: np.ndarray  # float [T]: on all classes seen after each task
    old_accuracy: np.ndarray  # float [T]: on the classes of earlier tasks
    new_accuracy: np.ndarray  # float [T]: on the classes of the task itself
    summary: dict  # avg, last, forgetting, bwt, old, new, harmonic
    params: Any  # the final head params
    stats: ClassStats  # of every class
    rows: list  # the metrics rows written to `metrics.jsonl` in `workdir`
    workdir: Path


def record_task(accuracy: np.ndarray, correct, total, bounds, task: int):
    """(A with row `task` filled, float32 (seen, old, new) accuracies) from the counts [C]."""
    accuracy = accuracy.copy()
    accuracy[task, : task + 1] = count_row(correct, total, bounds, task)[: task + 1]
    old, seen = int(bounds[task]), int(bounds[task + 1])
    ranges = ((0, seen), (0, old), (old, seen))
    curve = tuple(float(np.float32(accuracy_of(correct, total, lo, hi))) for lo, hi in ranges)
    return accuracy, curve


def metrics_row(task: int, seen: int, accuracy, curve: tuple, info: dict, seconds: float) -> dict:
    """The `metrics.jsonl` row of `task` (NaN -> None); `curve`: its (seen, old, new) accuracy."""
    row = {
        "task": task,
        "seen_classes": seen,
        "accuracy": curve[0],
        "accuracy_row": [float(v) for v in accuracy[task, : task + 1]],
        "old_accuracy": curve[1],
        "new_accuracy": curve[2],
        "loss": info["loss"],
        "train_seconds": round(seconds, 3),
        "steps": info["steps"],
    }
    return jsonable(row)


def summary(accuracy: np.ndarray, curves: np.ndarray) -> dict[str, float]:
    """avg, last, forgetting, bwt, old, new, harmonic from A [T, T] and seen/old/new [3, T]."""
    seen, old, new = curves
    return {
        "avg": average_accuracy(seen),
        "last": last_accuracy(seen),
        "forgetting": forgetting(accuracy),
        "bwt": backward_transfer(accuracy),
        "old": float(old[-1]),
        "new": float(new[-1]),
        "harmonic": harmonic_mean(old[-1], new[-1]) if len(seen) > 1 else float("nan"),
    }


def continual_result(accuracy, rows: list, params, class_stats, workdir: Path) -> ContinualResult:
    keys = ("accuracy", "old_accuracy", "new_accuracy")  # None in a row (JSON's NaN) -> NaN
    curves = np.asarray(
        [[np.nan if r[k] is None else r[k] for r in rows] for k in keys], np.float32
    )
    seen, old, new = np.asarray(curves, np.float64)
    return ContinualResult(
        accuracy_matrix=np.asarray(accuracy, np.float64), seen_accuracy=seen, old_accuracy=old,
        new_accuracy=new, summary=summary(accuracy, curves), params=params, stats=class_stats,
        rows=rows, workdir=workdir,
    )  # fmt: skip
