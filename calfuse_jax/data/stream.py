"""Frozen features of a whole dataset, cut into tasks: the input of `continual.run_continual`."""

from __future__ import annotations

import dataclasses

import numpy as np

from calfuse_jax.data.protocol import TaskSplit


@dataclasses.dataclass(frozen=True)
class FeatureStream:
    """Per-image frozen CLIP features (not normalised) and dataset labels, plus the task split;
    `task` and `seen` return labels mapped to positions (see `protocol`)."""

    train_features: np.ndarray  # float32 [N, D]
    train_labels: np.ndarray  # int [N]
    test_features: np.ndarray  # float32 [M, D]
    test_labels: np.ndarray  # int [M]
    split: TaskSplit
    class_names: tuple[str, ...] | None = None  # by dataset label

    @property
    def dim(self) -> int:
        return int(self.train_features.shape[1])

    def task(self, task: int, subset: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Features and positions of task `task`'s classes only: ([n, D], int [n])."""
        return self._select(subset, self.split.bounds[task], self.split.bounds[task + 1])

    def seen(self, task: int, subset: str = "test") -> tuple[np.ndarray, np.ndarray]:
        """Features and positions of every class seen after task `task`."""
        return self._select(subset, 0, self.split.bounds[task + 1])

    def _subset(self, subset: str) -> tuple[np.ndarray, np.ndarray]:
        if subset not in ("train", "test"):
            raise ValueError(f"subset must be 'train' or 'test', got {subset!r}")
        return getattr(self, f"{subset}_features"), getattr(self, f"{subset}_labels")

    def _select(self, subset: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        features, labels = self._subset(subset)
        positions = self.split.to_positions(labels)
        keep = (positions >= lo) & (positions < hi)
        return features[keep], positions[keep]

    def text_by_position(self, text_features: np.ndarray) -> np.ndarray:
        """Reorders text features [C_dataset, D] (by dataset label) to positions [C, D]."""
        return np.asarray(text_features)[self.split.class_order]

    def check(self, text_features: np.ndarray) -> None:
        """Raises ValueError on inputs that cannot make a valid run: shapes, finite values, and
        every class of every task with 2 training rows (a covariance) and 1 test row."""
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
        for subset in ("train", "test"):
            features, labels = self._subset(subset)
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
