"""Checks of a run's inputs before anything is written: shapes, finite values, and every task
holding enough samples of each class (2 training rows for a covariance, 1 test row for accuracy).
"""

from __future__ import annotations

import numpy as np

from calfuse_jax.data.stream import FeatureStream


def validate_inputs(stream: FeatureStream, text_features: np.ndarray) -> None:
    """Raises ValueError on inputs that cannot make a valid run (before anything is written)."""
    split, dim = stream.split, stream.dim
    text = np.asarray(text_features)
    if stream.test_features.ndim != 2 or stream.test_features.shape[1] != dim:
        raise ValueError(
            f"test features have shape {stream.test_features.shape} but train features are "
            f"{dim}-d; extract both with the same model"
        )
    if text.ndim != 2 or text.shape[1] != dim:
        raise ValueError(
            f"text features have shape {text.shape} but image features are {dim}-d; use the text "
            "and image embeddings of the same CLIP model"
        )
    if int(split.class_order.max()) >= text.shape[0]:
        raise ValueError(
            f"class order uses label {int(split.class_order.max())} but there are only "
            f"{text.shape[0]} text embeddings (one per dataset label)"
        )
    for subset, features, labels in (
        ("train", stream.train_features, stream.train_labels),
        ("test", stream.test_features, stream.test_labels),
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
                    f"task {task} (dataset labels {split.class_order[lo:hi][:10].tolist()}) has "
                    f"no {subset} features; check the class order and task sizes"
                )
            few = np.flatnonzero(counts[lo:hi] < (2 if subset == "train" else 1))
            if few.size:
                labels_few = split.class_order[lo + few][:10].tolist()
                need = "2 training" if subset == "train" else "1 test"
                raise ValueError(
                    f"task {task}: classes with dataset labels {labels_few} have fewer than "
                    f"{need} features (class statistics and accuracy need them)"
                )
