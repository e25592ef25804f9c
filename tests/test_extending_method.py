"""README "Extending": adding a method is one new module plus one registry line (executed here).

The example is a nearest-class-mean baseline; its accuracy after every task is checked against
an independent NumPy transcription of NCM on the same stream.
"""

import sys
import types

import numpy as np
import pytest
from readme_blocks import blocks

from calfuse_jax import methods

# README's three blocks: the new module calfuse_jax/stored_mean.py, the line added to `REGISTRY` in
# calfuse_jax/methods.py, and selecting it.
NCM_MODULE, REGISTRY_LINE, RUN = blocks("Adding a method")


@pytest.fixture
def ncm_method(monkeypatch):
    """Installs the example as `calfuse_jax.stored_mean` and its registry entry (removed after)."""
    module = types.ModuleType("calfuse_jax.stored_mean")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(NCM_MODULE, "calfuse_jax/stored_mean.py", "exec"), vars(module))
    entry = eval("{" + REGISTRY_LINE + "}", {"Entry": methods.Entry, "stored_mean": module})
    monkeypatch.setitem(methods.REGISTRY, "stored-mean", entry["stored-mean"])


def numpy_ncm_accuracy(stream) -> np.ndarray:
    """[T] accuracy (%) on the seen classes after each task: prototypes are the classes' mean
    training features, predictions the most cosine-similar seen prototype."""
    order, bounds = stream.split.class_order, stream.split.bounds
    features = stream.train_features.astype(np.float64)
    protos = np.stack([features[stream.train_labels == label].mean(axis=0) for label in order])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    test = stream.test_features.astype(np.float64)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    position = np.argsort(order)[stream.test_labels]  # dataset label -> position in the order
    accuracy = []
    for task in range(len(bounds) - 1):
        seen = position < bounds[task + 1]
        predicted = np.argmax(test[seen] @ protos[: bounds[task + 1]].T, axis=1)
        accuracy.append(100.0 * np.mean(predicted == position[seen]))
    return np.array(accuracy)


def test_a_new_method_runs_end_to_end(ncm_method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(RUN, "extending_method.md", "exec"), scope)
    result, stream = scope["result"], scope["stream"]
    assert [row["steps"] for row in result.rows] == [0, 0, 0]  # no training
    assert result.params == {}
    expected = numpy_ncm_accuracy(stream)
    assert 20 < expected[-1] < 90  # a stream where NCM makes mistakes, so the check can fail
    np.testing.assert_allclose(result.seen_accuracy, expected, rtol=1e-6)
