"""Class orders and task splits, pure NumPy. Downstream works in *positions*: position p is the
p-th class of the class order, so task t owns positions `[bounds[t], bounds[t + 1])`."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TaskSplit:
    """A class order cut into tasks."""

    class_order: np.ndarray  # int [C], the dataset label at each position
    bounds: np.ndarray  # int [T + 1], task t owns positions `bounds[t]:bounds[t + 1]`

    @property
    def num_tasks(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_classes(self) -> int:
        return int(self.bounds[-1])

    def to_positions(self, labels: np.ndarray) -> np.ndarray:
        """Maps dataset labels to positions; raises on a label outside the class order."""
        labels = np.asarray(labels)
        lookup = np.full(max(int(self.class_order.max()), int(labels.max(initial=0))) + 1, -1)
        lookup[self.class_order] = np.arange(len(self.class_order))
        if labels.size and labels.min() < 0:
            raise ValueError(f"negative label {labels.min()} in the data")
        positions = lookup[labels] if labels.size else labels.astype(np.int64)
        if labels.size and (positions < 0).any():
            bad = np.unique(labels[positions < 0])[:10].tolist()
            raise ValueError(
                f"labels {bad} are not in the class order ({len(self.class_order)} classes); "
                "check the dataset's label range against config.class_order"
            )
        return positions.astype(np.int64)


def make_split(class_order, initial: int, increment: int) -> TaskSplit:
    """Cuts `class_order` into a first task of `initial` classes, then tasks of `increment` (B50
    Inc10 is `make_split(order, 50, 10)`); a remainder becomes a shorter last task."""
    order = np.asarray(class_order, dtype=np.int64)
    if order.ndim != 1 or len(np.unique(order)) != len(order):
        raise ValueError("class_order must be a 1-D list of distinct labels")
    if not 0 < initial <= len(order) or increment <= 0:
        raise ValueError(
            f"need 0 < initial <= {len(order)} and increment > 0, got initial={initial}, "
            f"increment={increment}"
        )
    bounds = [0, *range(initial, len(order), increment), len(order)]
    return TaskSplit(class_order=order, bounds=np.asarray(bounds, dtype=np.int64))


def seeded_order(num_classes: int, seed: int = 1993) -> np.ndarray:
    """The PyCIL/C3Box class order: `np.random.seed(seed); np.random.permutation(n)`."""
    return np.random.RandomState(seed).permutation(num_classes)
