"""Datasets, class orders and task splits."""

from calfuse_jax.data.images import ImageDataset
from calfuse_jax.data.protocol import TaskSplit, make_split, seeded_order
from calfuse_jax.data.registry import DATASETS, load_dataset
from calfuse_jax.data.stream import FeatureStream

__all__ = ["DATASETS", "FeatureStream", "ImageDataset", "TaskSplit", "load_dataset", "make_split",
           "seeded_order"]  # fmt: skip
