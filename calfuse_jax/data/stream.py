"""Frozen features of a whole dataset, cut into tasks: the input of `continual.run_continual`."""

from __future__ import annotations

import dataclasses

import numpy as np

from calfuse_jax.data.protocol import TaskSplit


@dataclasses.dataclass(frozen=True)
class FeatureStream:
    """Per-image frozen CLIP features and labels, plus the task split.

    Labels are dataset labels; `task(t, 'train')` returns features with labels mapped to positions
    (see `protocol`). Text features are indexed by dataset label, `text_by_position()` reorders
    them.

    Attributes:
      train_features: float32 [N, D] image embeddings f0 (not normalised).
      train_labels: int [N] dataset labels.
      test_features: float32 [M, D].
      test_labels: int [M].
      split: the class order and task bounds.
      class_names: optional names indexed by dataset label.
    """

    train_features: np.ndarray
    train_labels: np.ndarray
    test_features: np.ndarray
    test_labels: np.ndarray
    split: TaskSplit
    class_names: tuple[str, ...] | None = None

    @property
    def dim(self) -> int:
        return int(self.train_features.shape[1])

    def task(self, task: int, subset: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Features and positions of task `task`'s classes only: ([n, D], int [n])."""
        lo, hi = self.split.bounds[task], self.split.bounds[task + 1]
        return self._select(subset, lo, hi)

    def seen(self, task: int, subset: str = "test") -> tuple[np.ndarray, np.ndarray]:
        """Features and positions of every class seen after task `task`."""
        return self._select(subset, 0, self.split.bounds[task + 1])

    def _select(self, subset: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        if subset == "train":
            features, labels = self.train_features, self.train_labels
        elif subset == "test":
            features, labels = self.test_features, self.test_labels
        else:
            raise ValueError(f"subset must be 'train' or 'test', got {subset!r}")
        positions = self.split.to_positions(labels)
        keep = (positions >= lo) & (positions < hi)
        return features[keep], positions[keep]

    def text_by_position(self, text_features: np.ndarray) -> np.ndarray:
        """Reorders text features [C_dataset, D] (by dataset label) to positions [C, D]."""
        return np.asarray(text_features)[self.split.class_order]
