"""Evaluation of the head after each task, and the per-task numbers it turns into.

`evaluate` counts correct predictions per class over the seen classes' test features (one
compiled function for every batch and task of a run); `record_task` fills the task's row of the
accuracy matrix and its seen/old/new accuracies; `metrics_row` is the row written to
`metrics.jsonl`; `summary` gives the final numbers (avg, last, forgetting, BWT, old, new,
harmonic). All accuracies are percentages, NaN where a set of classes is empty.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from calfuse_jax import metrics, sharding, stats
from calfuse_jax.methods import Method, TaskInputs
from calfuse_jax.rundir import jsonable as json_safe
from calfuse_jax.train import TRACES, host_batch


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
    stats: stats.ClassStats
    rows: list
    workdir: Path


def _eval_counts(params, batch, inputs: TaskInputs, method: Method):
    TRACES["eval_counts"] += 1
    f0, positions, mask = batch
    classes = inputs.text.shape[0]
    logits = method.logits(params, f0, inputs)
    logits = jnp.where(jnp.arange(classes) < inputs.ctx.num_seen, logits, -jnp.inf)
    correct = (jnp.argmax(logits, axis=-1) == positions).astype(jnp.float32) * mask
    return (
        jax.ops.segment_sum(correct, positions, num_segments=classes),
        jax.ops.segment_sum(mask, positions, num_segments=classes),
    )


@functools.lru_cache(maxsize=16)
def eval_counts_fn(method: Method, mesh: Mesh):
    """Jitted `(params, batch, inputs) -> (correct [C], count [C])` per class."""
    counts = functools.partial(_eval_counts, method=method)
    return jax.jit(counts, out_shardings=sharding.replicated(mesh))


def evaluate(
    method: Method,
    params,
    features: np.ndarray,
    labels: np.ndarray,
    inputs: TaskInputs,
    mesh: Mesh,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(correct [C], count [C]) of the head on (features [M, D], positions [M]), batched.

    Every batch has `batch_size` rows (rounded up to the mesh size; the last one padded with mask
    0), so one compiled function serves every batch and task of a run.
    """
    counts = eval_counts_fn(method, mesh)
    size = sharding.padded_size(batch_size, mesh)
    classes = inputs.text.shape[0]
    correct, total = np.zeros(classes), np.zeros(classes)
    for start in range(0, len(labels), size):
        rows = np.arange(start, min(start + size, len(labels)))
        batch = sharding.shard_batch(host_batch(features, labels, rows, size), mesh)
        c, n = sharding.to_host(counts(params, batch, inputs))
        correct, total = correct + c, total + n
    return correct, total


def accuracy_of(correct: np.ndarray, total: np.ndarray, lo: int, hi: int) -> float:
    """Accuracy (%) over class positions lo..hi-1 from per-class counts; NaN with no samples."""
    n = total[lo:hi].sum()
    return float(100.0 * correct[lo:hi].sum() / n) if n else float("nan")


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
    for j in range(task + 1):
        accuracy[task, j] = accuracy_of(correct, total, bounds[j], bounds[j + 1])
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
        "avg": metrics.average_accuracy(seen),
        "last": metrics.last_accuracy(seen),
        "forgetting": metrics.forgetting(accuracy) if several else float("nan"),
        "bwt": metrics.backward_transfer(accuracy) if several else float("nan"),
        "old": float(old[-1]),
        "new": float(new[-1]),
        "harmonic": metrics.harmonic_mean(old[-1], new[-1]) if several else float("nan"),
    }


def curves_of(rows: list[dict]) -> np.ndarray:
    """float32 [3, T]: the seen, old and new accuracy of each row (NaN where the row has None)."""
    keys = ("accuracy", "old_accuracy", "new_accuracy")
    values = [[np.nan if row[k] is None else row[k] for row in rows] for k in keys]
    return np.asarray(values, np.float32).reshape(3, len(rows))


def continual_result(carry: dict, workdir: Path) -> ContinualResult:
    """The `ContinualResult` of a finished run's carry (params fetched to the host)."""
    accuracy, curves = carry["accuracy"], curves_of(carry["rows"])
    seen, old, new = curves
    return ContinualResult(
        accuracy_matrix=np.asarray(accuracy, np.float64),
        seen_accuracy=np.asarray(seen, np.float64),
        old_accuracy=np.asarray(old, np.float64),
        new_accuracy=np.asarray(new, np.float64),
        summary=summary(accuracy, curves),
        params=sharding.to_host(carry["params"]),
        stats=carry["stats"],
        rows=carry["rows"],
        workdir=workdir,
    )
