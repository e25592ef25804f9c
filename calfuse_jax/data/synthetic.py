"""A seeded synthetic class-incremental benchmark: "CLIP-like" image features (unit class
prototypes through a shared distortion, plus noise) and text features (prototypes plus a little
noise), with some deliberately close class pairs for the hard-pair mechanism.
"""

from __future__ import annotations

import numpy as np

from calfuse_jax.data.protocol import make_split, seeded_order
from calfuse_jax.data.stream import FeatureStream

FEATURE_NORM = 10.0  # typical norm of a CLIP ViT-B/16 image embedding


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def class_prototypes(
    rng: np.random.Generator, num_classes: int, dim: int, close_pairs: int, pair_distance: float
) -> np.ndarray:
    """Unit prototypes [C, D]; classes 2i+1 sit `pair_distance` (chord) from 2i for i < pairs."""
    protos = _unit(rng.standard_normal((num_classes, dim)))
    for i in range(close_pairs):
        anchor, partner = protos[2 * i], 2 * i + 1
        offset = rng.standard_normal(dim)
        offset = _unit(offset - offset @ anchor * anchor)  # orthogonal to the anchor
        # At chord distance d from the anchor: the angle theta with 2 sin(theta/2) = d.
        theta = 2 * np.arcsin(pair_distance / 2)
        protos[partner] = np.cos(theta) * anchor + np.sin(theta) * offset
    return protos


def make_synthetic_stream(
    num_classes: int = 50,
    dim: int = 64,
    train_per_class: int = 100,
    test_per_class: int = 50,
    initial: int = 10,
    increment: int = 10,
    seed: int = 0,
    noise: float = 1.0,
    close_pairs: int = 4,
    pair_distance: float = 0.5,
    text_noise: float = 0.8,
    distortion: float = 1.5,
    class_order: np.ndarray | None = None,
) -> tuple[FeatureStream, np.ndarray]:
    """(stream, text): a `FeatureStream` (labels are dataset labels; float32 features of norm
    about 10) and unit float32 text embeddings [C, D] indexed by dataset label.

    `seed` seeds every draw (prototypes, distortion, noise, class order); `class_order`: dataset
    labels in task order, default `seeded_order(num_classes, seed)`. `noise`: norm of the image
    noise next to the unit prototype; `close_pairs`: number of (2i, 2i+1) label pairs
    `pair_distance` (chord) apart; `text_noise`: norm of the text noise; `distortion`: strength
    of the shared map from text to image space (0: zero-shot works).
    """
    if 2 * close_pairs > num_classes:
        raise ValueError(f"close_pairs={close_pairs} needs at least {2 * close_pairs} classes")
    if min(train_per_class, test_per_class) < 1:
        raise ValueError("train_per_class and test_per_class must be >= 1")
    rng = np.random.default_rng(seed)  # draws in this order: prototypes, text, mixing, noise
    protos = class_prototypes(rng, num_classes, dim, close_pairs, pair_distance)
    text_offsets = _unit(rng.standard_normal((num_classes, dim)))
    # A close pair shares its text noise, so its text embeddings stay as close as its prototypes.
    text_offsets[1 : 2 * close_pairs : 2] = text_offsets[0 : 2 * close_pairs : 2]
    text = _unit(protos + text_noise * text_offsets)
    # A near-identity map: image space = text space seen through a fixed domain shift.
    mixing = np.eye(dim) + distortion * rng.standard_normal((dim, dim)) / np.sqrt(dim)
    image_protos = _unit(protos @ mixing.T)
    train = _draw(rng, image_protos, train_per_class, noise)
    test = _draw(rng, image_protos, test_per_class, noise)
    order = seeded_order(num_classes, seed) if class_order is None else np.asarray(class_order)
    names = tuple(f"class_{c}" for c in range(num_classes))
    stream = FeatureStream(*train, *test, make_split(order, initial, increment), names)
    return stream, text.astype(np.float32)


def _draw(rng: np.random.Generator, image_protos: np.ndarray, per_class: int, noise: float):
    """(float32 features [C * n, D] of norm about FEATURE_NORM, int64 labels [C * n])."""
    num_classes, dim = image_protos.shape
    labels = np.repeat(np.arange(num_classes), per_class)
    eps = rng.standard_normal((len(labels), dim)) * noise / np.sqrt(dim)
    features = FEATURE_NORM * (image_protos[labels] + eps)
    return features.astype(np.float32), labels.astype(np.int64)
