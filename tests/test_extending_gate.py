"""README "Extending": adding a gate mode is one function in calibration.py (executed here)."""

import jax
import numpy as np
import pytest

from calfuse_jax import calibration, methods

# The notes' first block, as it would be added to calfuse_jax/calibration.py.
ADD_TO_CALIBRATION = '''
def _capped_gate(head, f0, fa, ctx):
    """The linear schedule g_first -> g_last, never above `value`."""
    return jnp.minimum(_schedule_gate(head, f0, fa, ctx), head.value)


GATES["capped"] = _capped_gate  # or add the entry to the GATES literal
'''

RUN = """
from calfuse_jax.config import method_config
from calfuse_jax.continual import run_continual
from calfuse_jax.data.synthetic import make_synthetic_stream

stream, text = make_synthetic_stream(
    num_classes=15, dim=32, train_per_class=15, test_per_class=8, initial=5, increment=5
)
config = method_config()
config.calibration.update(mode="capped", g_first=0.2, g_last=0.8, value=0.5)
config.train.update(epochs=2, batch_size=32)
result = run_continual(stream, text, config, "runs/capped", progress=False)
print(result.summary)
"""


@pytest.fixture
def capped_mode(monkeypatch):
    monkeypatch.setitem(calibration.GATES, "capped", None)  # removed again after the test
    exec(compile(ADD_TO_CALIBRATION, "calibration.py", "exec"), vars(calibration).copy())


def test_a_new_gate_mode_runs_end_to_end(capped_mode, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(RUN, "extending_gate.md", "exec"), scope)
    result, config, stream = scope["result"], scope["config"], scope["stream"]
    assert [row["steps"] for row in result.rows] == [6, 6, 6]  # trained every task
    assert np.isfinite(result.summary["last"])
    # The gate the head computed on each task: 0.2, 0.5 (the linear 0.5), 0.8 capped at 0.5.
    head = methods.make_head(config, stream.dim)
    bounds = stream.split.bounds
    f0 = stream.test_features[:3]
    gates = [
        float(head.apply({"params": result.params}, f0, calibration.task_context(bounds, t))[1][0])
        for t in range(3)
    ]
    np.testing.assert_allclose(gates, [0.2, 0.5, 0.5], rtol=1e-6)
    assert jax.tree.structure(result.params) == jax.tree.structure({"adapter": {"kernel": 0}})
