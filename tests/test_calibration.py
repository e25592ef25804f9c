"""Calibration gate and head against the NumPy formula of DESIGN.md §2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calfuse_jax import calibration
from calfuse_jax.calibration import CalibratedHead, calibrate, head_logits, task_context


def np_normalize(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def np_calibrate(f0, fa, gate):
    gate = np.asarray(gate, np.float64).reshape(-1, 1) if np.ndim(gate) else gate
    return np_normalize(gate * np_normalize(f0) + (1 - gate) * np_normalize(fa))


def features(seed, batch=4, dim=8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, dim)).astype(np.float32), rng.normal(size=(batch, dim)).astype(
        np.float32
    )


@pytest.mark.parametrize("gate", [0.0, 0.3, 1.0, np.array([0.0, 0.25, 0.5, 1.0], np.float32)])
def test_calibrate_matches_numpy(gate):
    f0, fa = features(0)
    got = jax.jit(calibrate)(f0, fa, gate)
    np.testing.assert_allclose(np.asarray(got), np_calibrate(f0, fa, gate), atol=1e-6)


def test_calibrate_zero_feature_stays_finite():
    f0, fa = features(1)
    fa[0] = 0.0
    got = np.asarray(calibrate(f0, fa, 0.0))
    assert np.isfinite(got).all()
    grads = jax.grad(lambda x: jnp.sum(calibrate(f0, x, 0.3)))(jnp.asarray(fa))
    assert np.isfinite(np.asarray(grads)).all()


def test_calibrate_under_vmap():
    f0, fa = features(2, batch=6)
    gates = np.linspace(0, 1, 6).astype(np.float32)
    per_row = jax.vmap(lambda a, b, g: calibrate(a[None], b[None], g)[0])(f0, fa, gates)
    np.testing.assert_allclose(np.asarray(per_row), np_calibrate(f0, fa, gates), atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    gate=st.floats(0.0, 1.0),
    scale0=st.floats(0.01, 100.0),
    scale_a=st.floats(0.01, 100.0),
)
def test_calibration_invariants(seed, gate, scale0, scale_a):
    f0, fa = features(seed)
    out = np.asarray(calibrate(f0, fa, gate))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
    # Only directions matter: rescaling f0 and fa by positive numbers changes nothing.
    rescaled = np.asarray(calibrate(scale0 * f0, scale_a * fa, gate))
    np.testing.assert_allclose(rescaled, out, atol=1e-5)
    # The end points are the two normalised features themselves.
    np.testing.assert_allclose(np.asarray(calibrate(f0, fa, 1.0)), np_normalize(f0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(calibrate(f0, fa, 0.0)), np_normalize(fa), atol=1e-6)
    # The calibrated feature lies between them: at least as close to n(f0) as n(fa) is when g>0.5.
    cos_f0 = np.sum(out * np_normalize(f0), -1)
    cos_fa = np.sum(out * np_normalize(fa), -1)
    if gate > 0.5:
        assert np.all(cos_f0 >= cos_fa - 1e-5)


BOUNDS = [0, 10, 20, 30, 40, 50]  # 5 tasks of 10 classes
CTX = task_context(BOUNDS, 2)  # task 2 of 5: 20 old classes, 30 seen


@pytest.mark.parametrize(
    "fields,ctx,expected",
    [
        ({"mode": "none"}, CTX, 0.0),
        ({"mode": "fixed", "value": 0.7}, CTX, 0.7),
        ({"mode": "schedule", "g_first": 0.0, "g_last": 0.5}, CTX, 0.25),  # 0.5 * 2 / 4
        ({"mode": "schedule", "g_first": 0.2, "g_last": 0.6}, task_context(BOUNDS, 4), 0.6),
        ({"mode": "schedule", "schedule": "old_fraction"}, CTX, 20 / 30),
        ({"mode": "schedule", "schedule": "old_fraction"}, task_context(BOUNDS, 0), 0.0),
        ({"mode": "schedule", "g_first": 0.1}, task_context([0, 10], 0), 0.1),  # a single task
    ],
)
def test_gate_of_each_host_free_mode(fields, ctx, expected):
    # Computed inside the head from the traced context: one jitted apply serves every task.
    f0, _ = features(9)
    head = CalibratedHead(dim=8, **fields)
    params = head.init(jax.random.key(0), f0, ctx)
    out, gate = jax.jit(head.apply)(params, f0, ctx)
    np.testing.assert_allclose(np.asarray(gate), np.full(4, expected), rtol=1e-6)
    fa = f0 @ np.asarray(params["params"]["adapter"]["kernel"])
    np.testing.assert_allclose(np.asarray(out), np_calibrate(f0, fa, expected), atol=1e-6)


def test_unknown_mode_schedule_and_init_are_refused():
    f0, _ = features(6)
    with pytest.raises(ValueError, match="unknown gate mode 'other'; choose one of none, fixed"):
        CalibratedHead(dim=8, mode="other").init(jax.random.key(0), f0, CTX)
    with pytest.raises(ValueError, match="unknown gate schedule 'cosine'"):
        CalibratedHead(dim=8, mode="schedule", schedule="cosine").init(jax.random.key(0), f0, CTX)
    with pytest.raises(ValueError, match="unknown adapter init 'zeros'"):
        CalibratedHead(dim=8, adapter_init="zeros").init(jax.random.key(0), f0, CTX)
    with pytest.raises(ValueError, match=r"f0 must be \[B, 8\]"):
        CalibratedHead(dim=8).init(jax.random.key(0), jnp.ones((2, 7)), CTX)


@pytest.mark.parametrize(
    "mode,calib_shapes",
    [
        ("none", None),
        ("fixed", None),
        ("schedule", None),
        ("learned", {"a": ()}),
        ("dynamic", {"kernel": (24, 1), "bias": (1,)}),
    ],
)
def test_head_param_tree(mode, calib_shapes):
    head = CalibratedHead(dim=8, mode=mode)
    params = head.init(jax.random.key(0), jnp.ones((2, 8)), CTX)["params"]
    assert params["adapter"]["kernel"].shape == (8, 8)
    if calib_shapes is None:
        assert set(params) == {"adapter"}
    else:
        assert jax.tree.map(jnp.shape, params["calib"]) == calib_shapes


def test_head_inits():
    dim = 64
    kernel = CalibratedHead(dim=dim).init(jax.random.key(0), jnp.ones((1, dim)), CTX)["params"]
    kernel = np.asarray(kernel["adapter"]["kernel"])
    bound = 1 / np.sqrt(dim)
    assert np.abs(kernel).max() <= bound
    # Uniform(-a, a) has variance a^2 / 3; 4096 draws put the estimate within ~5% (5 sigma).
    assert kernel.var() == pytest.approx(bound**2 / 3, rel=0.1)
    head = CalibratedHead(dim=8, adapter_init="identity", mode="learned", init_bias=1.0)
    f0, _ = features(3)
    params = head.init(jax.random.key(0), f0, CTX)
    out, gate = head.apply(params, f0, CTX)
    np.testing.assert_allclose(np.asarray(gate), 1 / (1 + np.exp(-1.0)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out), np_normalize(f0), atol=1e-6)  # fa = f0


def test_dynamic_head_matches_numpy():
    dim = 8
    head = CalibratedHead(dim=dim, mode="dynamic", init_bias=0.5)
    f0, _ = features(4, dim=dim)
    params = head.init(jax.random.key(0), f0, CTX)["params"]
    rng = np.random.default_rng(5)
    params = {
        "adapter": {"kernel": rng.normal(size=(dim, dim)).astype(np.float32)},
        "calib": {
            "kernel": rng.normal(size=(3 * dim, 1)).astype(np.float32),
            "bias": np.array([0.5], np.float32),
        },
    }
    out, gate = jax.jit(head.apply)({"params": params}, f0, CTX)
    fa = f0 @ params["adapter"]["kernel"]  # Flax kernel = W^T: fa = W f0
    n0, na = np_normalize(f0), np_normalize(fa)
    inputs = np.concatenate([n0, na, n0 * na], axis=-1)
    expected_gate = 1 / (1 + np.exp(-(inputs @ params["calib"]["kernel"][:, 0] + 0.5)))
    np.testing.assert_allclose(np.asarray(gate), expected_gate, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out), np_calibrate(f0, fa, expected_gate), atol=1e-5)


def test_head_logits():
    f0, fa = features(7)
    text = np_normalize(np.random.default_rng(8).normal(size=(5, 8)).astype(np.float32))
    feats = np_normalize(f0)
    got = head_logits(feats, text, 100.0)
    np.testing.assert_allclose(np.asarray(got), 100.0 * feats @ text.T, rtol=1e-5, atol=1e-4)
    assert calibration.normalize(jnp.zeros((1, 3))).tolist() == [[0.0, 0.0, 0.0]]
