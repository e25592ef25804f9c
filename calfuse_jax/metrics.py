"""Continual-learning metrics (DESIGN.md §3).

Conventions:
- Labels and predictions are class *positions* (see `data.protocol`); task j owns positions
  `bounds[j]:bounds[j + 1]`.
- `A[i, j]` = accuracy on the test images of task j's classes after training task i; valid for
  j <= i, NaN above the diagonal.
- `seen[i]` = accuracy on the test images of *all* classes seen after task i (positions
  `0..bounds[i + 1]-1`). This is what the papers average: it weights tasks by their number of test
  images, so it is not the plain mean of row i of A (use `seen_accuracies(A, task_sizes)` to get
  it from A).
- Accuracies are in percent by default (`accuracy(..., percent=False)` gives fractions). Every
  formula below is linear in the accuracies (except `harmonic_mean`, which is homogeneous), so the
  matrix-level metrics work in whichever unit A is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from calfuse_jax.rundir import jsonable as json_safe

if TYPE_CHECKING:
    from calfuse_jax.stats import ClassStats


def accuracy(logits_or_preds, labels, percent: bool = True, mask=None) -> jax.Array:
    """Top-1 accuracy `100 * mean(pred == label)` (jit/vmap-friendly).

    Args:
      logits_or_preds: [B, C] logits (argmax taken) or int [B] predicted positions.
      labels: int [B] positions.
      percent: percent (default) or fraction.
      mask: optional [B] booleans; only those rows count (0 when none does).

    Returns:
      scalar accuracy.
    """
    preds = jnp.asarray(logits_or_preds)
    labels = jnp.asarray(labels)
    if preds.ndim == labels.ndim + 1:
        preds = jnp.argmax(preds, axis=-1)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {preds.shape} and labels {labels.shape} do not match")
    correct = (preds == labels).astype(jnp.float32)
    weight = jnp.ones_like(correct) if mask is None else jnp.asarray(mask, jnp.float32)
    frac = jnp.sum(correct * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    return frac * 100.0 if percent else frac


def class_counts(preds, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct, total) float64 [C] per class position, from predicted and true positions [M]."""
    labels = np.asarray(labels)
    hits = (np.asarray(preds) == labels).astype(np.float64)
    correct = np.bincount(labels, weights=hits, minlength=num_classes)
    return correct, np.bincount(labels, minlength=num_classes).astype(np.float64)


def accuracy_of(correct, total, lo: int, hi: int, scale: float = 100.0) -> float:
    """`scale * correct / total` over class positions lo..hi-1 (count-based, so hand fractions
    match exactly); NaN with no samples."""
    n = total[lo:hi].sum()
    return float(scale * correct[lo:hi].sum() / n) if n else float("nan")


def count_row(correct, total, bounds: Sequence[int], task: int, scale: float = 100.0):
    """Row `task` of A, float64 [T] (NaN for j > task), from the per-class counts after `task`."""
    row = np.full(len(bounds) - 1, np.nan)
    for j in range(task + 1):
        row[j] = accuracy_of(correct, total, int(bounds[j]), int(bounds[j + 1]), scale)
    return row


def accuracy_row(preds, labels, bounds: Sequence[int], task: int, percent: bool = True):
    """Row `task` of A plus the seen-class accuracy, from one evaluation after task `task`.

    Args:
      preds: int [M] predicted positions for the test images `labels` refers to.
      labels: int [M] true positions (images of unseen classes are ignored).
      bounds: int [T + 1] task bounds.
      task: index i of the task just trained.

    Returns:
      (row float64 [T] with NaN for j > task, seen accuracy float).
    """
    counts = class_counts(preds, labels, int(bounds[-1]))
    scale = 100.0 if percent else 1.0
    seen = accuracy_of(*counts, 0, int(bounds[task + 1]), scale)
    return count_row(*counts, bounds, task, scale), seen


def accuracy_matrix(predictions: Sequence, labels, bounds: Sequence[int], percent: bool = True):
    """The accuracy matrix and seen-class accuracies from the evaluations after each task.

    Args:
      predictions: a sequence (one per finished task i, length <= T) of int [M] predicted
        positions on the test images `labels`.
      labels: int [M] true positions.
      bounds: int [T + 1] task bounds.

    Returns:
      (A float64 [T, T] with NaN where j > i or task i is not evaluated yet, seen float64 [T]).
    """
    num_tasks = len(bounds) - 1
    matrix = np.full((num_tasks, num_tasks), np.nan)
    seen = np.full(num_tasks, np.nan)
    for i, preds in enumerate(predictions):
        matrix[i], seen[i] = accuracy_row(preds, labels, bounds, i, percent)
    return matrix, seen


def seen_accuracies(matrix, task_sizes) -> np.ndarray:
    """`seen[i] = sum_{j<=i} n_j A[i, j] / sum_{j<=i} n_j`, n_j = test images of task j.

    Equals the accuracy on all seen classes after task i. Returns float64 [T].
    """
    matrix = np.asarray(matrix, np.float64)
    sizes = np.asarray(task_sizes, np.float64)
    out = np.full(matrix.shape[0], np.nan)
    for i in range(matrix.shape[0]):
        out[i] = np.sum(sizes[: i + 1] * matrix[i, : i + 1]) / np.sum(sizes[: i + 1])
    return out


def _seen_vector(seen_or_matrix, task_sizes) -> np.ndarray:
    values = np.asarray(seen_or_matrix, np.float64)
    if values.ndim == 1:
        return values
    if values.ndim == 2 and task_sizes is not None:
        return seen_accuracies(values, task_sizes)
    raise ValueError(
        "pass the per-task seen-class accuracies [T] (accuracy on all seen classes after each "
        "task), or the matrix A [T, T] together with task_sizes (test images per task); the plain "
        "row mean of A is not the papers' Avg"
    )


def average_accuracy(seen_or_matrix, task_sizes=None) -> float:
    """Avg = `mean_i seen[i]`, the seen-class accuracy averaged over all tasks (first included).

    Args:
      seen_or_matrix: seen [T], or A [T, T] with `task_sizes` [T].
    """
    return float(np.mean(_seen_vector(seen_or_matrix, task_sizes)))


def last_accuracy(seen_or_matrix, task_sizes=None) -> float:
    """Last = `seen[T - 1]`, the seen-class accuracy after the final task."""
    return float(_seen_vector(seen_or_matrix, task_sizes)[-1])


def forgetting(matrix) -> float:
    """Average forgetting after the last task T-1 (Chaudhry et al. 2018).

    `F = 1/(T-1) sum_{j<T-1} max_{j<=l<T-1} (A[l, j] - A[T-1, j])`; NaN when T = 1.
    Pass `A[:t+1, :t+1]` for the value after task t.
    """
    a = np.asarray(matrix, np.float64)
    last = a.shape[0] - 1
    if last < 1:
        return float("nan")
    drops = [np.max(a[j:last, j]) - a[last, j] for j in range(last)]
    return float(np.mean(drops))


def backward_transfer(matrix) -> float:
    """BWT = `1/(T-1) sum_{j<T-1} (A[T-1, j] - A[j, j])` (Lopez-Paz & Ranzato 2017); NaN when T = 1.

    Negative values mean forgetting.
    """
    a = np.asarray(matrix, np.float64)
    last = a.shape[0] - 1
    if last < 1:
        return float("nan")
    return float(np.mean([a[last, j] - a[j, j] for j in range(last)]))


def old_new_accuracy(preds, labels, num_old: int, num_seen: int, percent: bool = True):
    """Accuracy on old classes (positions < num_old) and new ones (num_old <= position < num_seen).

    Args:
      preds: [M, C] logits or int [M] predicted positions.
      labels: int [M] true positions.

    Returns:
      (old accuracy, new accuracy) as floats; old is NaN when num_old = 0, either is NaN when it
      has no test images.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.ndim == labels.ndim + 1:
        preds = np.argmax(preds, axis=-1)
    counts = class_counts(preds, labels, num_seen)
    scale = 100.0 if percent else 1.0
    return accuracy_of(*counts, 0, num_old, scale), accuracy_of(*counts, num_old, num_seen, scale)


def harmonic_mean(old: float, new: float) -> float:
    """H = `2 * old * new / (old + new)`; 0 when both are 0."""
    old, new = float(old), float(new)
    return 0.0 if old + new == 0 else 2.0 * old * new / (old + new)


# The task loop's bookkeeping (`continual`): per-class counts -> A, metrics rows, summary.


@dataclasses.dataclass
class ContinualResult:
    """The outcome of `run_continual` (percentages; NaN where undefined).

    Attributes:
      accuracy_matrix: float [T, T], A[i, j] = accuracy on task j's classes after task i; NaN
        above the diagonal.
      seen_accuracy: float [T], accuracy on all seen classes after each task.
      old_accuracy, new_accuracy: float [T], on classes of earlier tasks / of the task itself.
      summary: avg, last, forgetting, bwt, old, new, harmonic.
      params: final head params; stats: `ClassStats` of every class.
      rows: the metrics rows written to `metrics.jsonl`.
    """

    accuracy_matrix: np.ndarray
    seen_accuracy: np.ndarray
    old_accuracy: np.ndarray
    new_accuracy: np.ndarray
    summary: dict
    params: Any
    stats: ClassStats
    rows: list
    workdir: Path


def record_task(
    accuracy: np.ndarray, correct: np.ndarray, total: np.ndarray, bounds: np.ndarray, task: int
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A copy of the accuracy matrix [T, T] with row `task` filled, and the task's (seen, old,
    new) accuracies (float32 values, like the matrix).

    Args:
      correct, total: [C] per-class counts of `evaluate` after `task`.
      bounds: [T + 1] task boundaries in positions (task t owns bounds[t]:bounds[t+1]).
    """
    accuracy = accuracy.copy()
    accuracy[task, : task + 1] = count_row(correct, total, bounds, task)[: task + 1]
    old, seen = int(bounds[task]), int(bounds[task + 1])
    ranges = ((0, seen), (0, old), (old, seen))
    curve = tuple(float(np.float32(accuracy_of(correct, total, lo, hi))) for lo, hi in ranges)
    return accuracy, curve


def metrics_row(
    task: int, seen: int, accuracy: np.ndarray, curve: tuple, info: dict, seconds: float
) -> dict:
    """The `metrics.jsonl` row of `task` (NaN -> None, as it reads back from JSON); `curve` is
    the task's (seen, old, new) accuracy."""
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
    return {k: json_safe(v) for k, v in row.items()}


def summary(accuracy: np.ndarray, curves: np.ndarray) -> dict[str, float]:
    """avg, last, forgetting, bwt, old, new, harmonic of a finished run (NaN where undefined,
    e.g. forgetting with a single task)."""
    seen, old, new = curves
    several = accuracy.shape[0] > 1
    return {
        "avg": average_accuracy(seen),
        "last": last_accuracy(seen),
        "forgetting": forgetting(accuracy) if several else float("nan"),
        "bwt": backward_transfer(accuracy) if several else float("nan"),
        "old": float(old[-1]),
        "new": float(new[-1]),
        "harmonic": harmonic_mean(old[-1], new[-1]) if several else float("nan"),
    }


def curves_of(rows: list[dict]) -> np.ndarray:
    """float32 [3, T]: the seen, old and new accuracy of each row (NaN where the row has None)."""
    keys = ("accuracy", "old_accuracy", "new_accuracy")
    values = [[np.nan if row[k] is None else row[k] for row in rows] for k in keys]
    return np.asarray(values, np.float32).reshape(3, len(rows))


def continual_result(accuracy, rows: list, params, class_stats, workdir: Path) -> ContinualResult:
    """The `ContinualResult` of a finished run (host arrays): accuracy [T, T], the metrics rows."""
    curves = curves_of(rows)
    seen, old, new = np.asarray(curves, np.float64)
    return ContinualResult(
        accuracy_matrix=np.asarray(accuracy, np.float64),
        seen_accuracy=seen,
        old_accuracy=old,
        new_accuracy=new,
        summary=summary(accuracy, curves),
        params=params,
        stats=class_stats,
        rows=rows,
        workdir=workdir,
    )
