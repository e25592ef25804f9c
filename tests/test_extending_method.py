"""README "Extending": adding a method is one new module plus one registry line (executed here).

The example is a nearest-class-mean baseline; its accuracy after every task is checked against
an independent NumPy transcription of NCM on the same stream.
"""

import sys
import types

import numpy as np
import pytest

from calfuse_jax import methods

# The notes' first block: the new module, calfuse_jax/ncm.py.
NCM_MODULE = '''
"""Nearest class mean on the frozen features: no parameters, no training steps.

A class's prototype is the mean of its frozen training features, which the task loop keeps
anyway (`TaskInputs.means`, one row per class position); an image goes to the seen class whose
prototype is the most cosine-similar.
"""

import dataclasses

from calfuse_jax.calibration import normalize


@dataclasses.dataclass(frozen=True)
class NearestClassMean:
    trains = False  # the loop runs no steps and no fusion
    fusion_rules = ()

    @classmethod
    def build(cls, config, dim, logit_scale):
        return cls()

    def init(self, key):
        return {}

    def logits(self, params, f0, inputs):
        """[B, C] cosine similarity of f0 [B, D] to every class mean (classes without statistics
        have zero means and score 0; the evaluation masks the unseen ones)."""
        return normalize(f0) @ normalize(inputs.means).T
'''

# The notes' second block: the line added to `REGISTRY` in calfuse_jax/methods.py (with `ncm`
# added to its `from calfuse_jax import ...` line).
REGISTRY_LINE = """
    "ncm": Entry(ncm.NearestClassMean.build, {"train.epochs": 0}),
"""

# The notes' third block: selecting it.
RUN = """
from calfuse_jax.config import method_config
from calfuse_jax.continual import run_continual
from calfuse_jax.data.synthetic import make_synthetic_stream

stream, text = make_synthetic_stream(
    num_classes=15, dim=32, train_per_class=15, test_per_class=8, initial=5, increment=5, noise=3.0
)
config = method_config()
config.method = "ncm"
result = run_continual(stream, text, config, "runs/ncm", progress=False)
print(result.summary)
"""


@pytest.fixture
def ncm_method(monkeypatch):
    """Installs the example as `calfuse_jax.ncm` and its registry entry (both removed after)."""
    module = types.ModuleType("calfuse_jax.ncm")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(NCM_MODULE, "calfuse_jax/ncm.py", "exec"), vars(module))
    entry = eval("{" + REGISTRY_LINE + "}", {"Entry": methods.Entry, "ncm": module})
    monkeypatch.setitem(methods.REGISTRY, "ncm", entry["ncm"])


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
