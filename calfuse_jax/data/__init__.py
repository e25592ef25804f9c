"""Datasets, class orders and task splits."""

from calfuse_jax.data.protocol import TaskSplit, make_split, seeded_order
from calfuse_jax.data.stream import FeatureStream

__all__ = ["FeatureStream", "TaskSplit", "make_split", "seeded_order"]
