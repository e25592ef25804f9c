"""The synthetic benchmark: seeded, CLIP-like, partly zero-shot, with real hard pairs."""

import numpy as np

from calfuse_jax import stats
from calfuse_jax.data.protocol import seeded_order
from calfuse_jax.data.synthetic import make_synthetic_stream


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_seeded_and_shaped():
    args = dict(num_classes=20, dim=16, train_per_class=5, test_per_class=3, initial=10,
                increment=5, seed=4)  # fmt: skip
    stream, text = make_synthetic_stream(**args)
    again, text_again = make_synthetic_stream(**args)
    np.testing.assert_array_equal(stream.train_features, again.train_features)
    np.testing.assert_array_equal(text, text_again)
    other, _ = make_synthetic_stream(num_classes=20, dim=16, seed=5)
    assert not np.allclose(other.train_features[:5], stream.train_features[:5])
    assert stream.train_features.shape == (100, 16) and stream.train_features.dtype == np.float32
    assert stream.test_features.shape == (60, 16) and text.shape == (20, 16)
    np.testing.assert_array_equal(np.bincount(stream.train_labels), [5] * 20)
    np.testing.assert_array_equal(stream.split.class_order, seeded_order(20, 4))
    np.testing.assert_array_equal(stream.split.bounds, [0, 10, 15, 20])
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-6)
    norms = np.linalg.norm(stream.train_features, axis=1)
    assert 9.0 < norms.mean() < 16.0  # CLIP-like norm: 10 x |prototype + noise|


def test_zero_shot_works_partly_and_training_can_do_better():
    stream, text = make_synthetic_stream(seed=0)  # 50 classes, 64-d
    test = _unit(stream.test_features)
    zero_shot = np.mean(np.argmax(test @ text.T, axis=1) == stream.test_labels)
    means = _unit(np.stack([stream.train_features[stream.train_labels == c].mean(0)
                            for c in range(50)]))  # fmt: skip
    nearest_mean = np.mean(np.argmax(test @ means.T, axis=1) == stream.test_labels)
    assert 0.4 < zero_shot < 0.8  # measured 0.61
    assert nearest_mean > 0.95  # the classes are separable in image space: measured 0.99


def test_close_pairs_are_hard_pairs():
    stream, text = make_synthetic_stream(num_classes=30, dim=32, close_pairs=3, seed=2)
    distance = np.linalg.norm(text[:, None] - text[None], axis=-1)
    for i in range(3):
        assert distance[2 * i, 2 * i + 1] < 0.55  # below the default hard-pair threshold
    others = distance[np.triu_indices(30, 1)]
    assert np.sum(others < 0.55) == 3  # and no accidental ones
    # In positions: the pair (0, 1) becomes a hard (old, new) pair when its classes are split.
    pos = {label: p for p, label in enumerate(stream.split.class_order)}
    old, new = sorted([pos[0], pos[1]])
    pairs = stats.hard_pairs(stream.text_by_position(text), [old], [new], 0.55)
    np.testing.assert_array_equal(pairs, [[old, new]])
