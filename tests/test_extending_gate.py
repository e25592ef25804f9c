"""README "Extending": adding a gate mode is one function in calibration.py (executed here)."""

import jax
import numpy as np
import pytest
from readme_blocks import README, blocks

from calfuse_jax import calibration, methods

# README's two blocks: the function added to calfuse_jax/calibration.py, and the run.
ADD_TO_CALIBRATION, RUN = blocks("Adding a gate mode")


@pytest.fixture
def capped_mode(monkeypatch):
    monkeypatch.setitem(calibration.GATES, "capped", None)  # removed again after the test
    exec(compile(ADD_TO_CALIBRATION, "calibration.py", "exec"), vars(calibration).copy())


def test_a_new_gate_mode_runs_end_to_end(capped_mode, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(RUN, str(README), "exec"), scope)
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
