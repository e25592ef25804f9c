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

    def check(self, text_features: np.ndarray) -> None:
        """Raises ValueError on inputs that cannot make a valid run (before anything is written):
        shapes, finite values, and every task holding enough samples of each class (2 training
        rows for a covariance, 1 test row for accuracy)."""
        split, dim = self.split, self.dim
        text = np.asarray(text_features)
        if self.test_features.ndim != 2 or self.test_features.shape[1] != dim:
            raise ValueError(
                f"test features have shape {self.test_features.shape} but train features are "
                f"{dim}-d; extract both with the same model"
            )
        if text.ndim != 2 or text.shape[1] != dim:
            raise ValueError(
                f"text features have shape {text.shape} but image features are {dim}-d; use "
                "the text and image embeddings of the same CLIP model"
            )
        if int(split.class_order.max()) >= text.shape[0]:
            raise ValueError(
                f"class order uses label {int(split.class_order.max())} but there are only "
                f"{text.shape[0]} text embeddings (one per dataset label)"
            )
        for subset, features, labels in (
            ("train", self.train_features, self.train_labels),
            ("test", self.test_features, self.test_labels),
        ):
            if len(features) != len(labels):
                raise ValueError(f"{subset}: {len(features)} features but {len(labels)} labels")
            bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
            if bad.size:
                raise ValueError(
                    f"{subset} features contain NaN/Inf in {bad.size} rows (first rows "
                    f"{bad[:5].tolist()}); re-extract or drop them"
                )
            positions = split.to_positions(labels)  # raises on labels outside the class order
            counts = np.bincount(positions, minlength=split.num_classes)
            for task in range(split.num_tasks):
                lo, hi = split.bounds[task], split.bounds[task + 1]
                if counts[lo:hi].sum() == 0:
                    raise ValueError(
                        f"task {task} (dataset labels {split.class_order[lo:hi][:10].tolist()}) "
                        f"has no {subset} features; check the class order and task sizes"
                    )
                few = np.flatnonzero(counts[lo:hi] < (2 if subset == "train" else 1))
                if few.size:
                    labels_few = split.class_order[lo + few][:10].tolist()
                    need = "2 training" if subset == "train" else "1 test"
                    raise ValueError(
                        f"task {task}: classes with dataset labels {labels_few} have fewer than "
                        f"{need} features (class statistics and accuracy need them)"
                    )
