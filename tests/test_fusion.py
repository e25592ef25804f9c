"""QR / SVD fusion against an independent float64 NumPy implementation of DESIGN.md §2."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calfuse_jax import fusion
from calfuse_jax.calibration import CalibratedHead, task_context

# Square, wide (out < in) and tall (out > in): tall is the case where the complete factorisation
# matters. Small sizes keep float32 error far below the 1e-5 tolerance.
SHAPES = [(8, 8), (5, 9), (9, 5)]


def np_mix(basis, r_old, w_new, bias):
    p = basis.T @ w_new
    diff = np.abs(p - r_old)
    mask = np.minimum(1.0, diff / diff.max() + bias)
    return basis @ (mask * p + (1 - mask) * r_old)


def np_qr_fuse(w_old, w_new, bias):
    q, r = np.linalg.qr(w_old.astype(np.float64), mode="complete")
    return np_mix(q, r, w_new.astype(np.float64), bias)


def np_svd_fuse(w_old, w_new, bias):
    w_old = w_old.astype(np.float64)
    out_dim, in_dim = w_old.shape
    u, s, vh = np.linalg.svd(w_old, full_matrices=False)
    r = s[:, None] * vh
    if out_dim > in_dim:  # complete basis: U, then the Householder complement of span(U)
        u = np.concatenate([u, np.linalg.qr(u, mode="complete")[0][:, in_dim:]], axis=1)
        r = np.concatenate([r, np.zeros((out_dim - in_dim, in_dim))])
    return np_mix(u, r, w_new.astype(np.float64), bias)


def pair(shape, seed, step=0.3):
    rng = np.random.default_rng(seed)
    w_old = rng.normal(size=shape).astype(np.float32)
    w_new = (w_old + step * rng.normal(size=shape)).astype(np.float32)
    return w_old, w_new


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [0.0, 0.6])
def test_qr_fuse_matches_numpy(shape, bias):
    w_old, w_new = pair(shape, seed=1)
    got = fusion.qr_fuse(jnp.asarray(w_old), jnp.asarray(w_new), bias)
    np.testing.assert_allclose(np.asarray(got), np_qr_fuse(w_old, w_new, bias), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [0.0, 0.6])
def test_svd_fuse_matches_numpy(shape, bias):
    w_old, w_new = pair(shape, seed=2)
    got = fusion.svd_fuse(jnp.asarray(w_old), jnp.asarray(w_new), bias)
    np.testing.assert_allclose(np.asarray(got), np_svd_fuse(w_old, w_new, bias), atol=1e-5)


def test_fusion_keeps_new_where_it_moved_most():
    # One coefficient moves a lot: with b = 0 it gets M = 1 (new value), untouched ones M = 0.
    w_old = np.diag([3.0, 2.0, 1.0]).astype(np.float32)  # QR: Q = I (up to signs), R = W
    w_new = w_old.copy()
    w_new[0, 2] = 5.0
    got = np.asarray(fusion.qr_fuse(w_old, w_new, 0.0))
    np.testing.assert_allclose(got, w_new, atol=1e-6)


def test_tall_uses_complete_factorisation():
    # A reduced QR would project W_new onto W_old's column space; the complete one keeps the
    # orthogonal part when the mask is close to 1.
    w_old, w_new = pair((9, 4), seed=3, step=1.0)
    got = np.asarray(fusion.qr_fuse(w_old, w_new, 0.999))
    assert np.abs(got - w_new).max() < 1e-2
    got_svd = np.asarray(fusion.svd_fuse(w_old, w_new, 0.999))
    assert np.abs(got_svd - w_new).max() < 1e-2


@pytest.mark.parametrize("fuse", [fusion.qr_fuse, fusion.svd_fuse])
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_at_least_one_returns_new_and_equal_returns_old(fuse, shape):
    w_old, w_new = pair(shape, seed=4)
    np.testing.assert_array_equal(np.asarray(fuse(w_old, w_new, 1.0)), w_new)
    np.testing.assert_array_equal(np.asarray(fuse(w_old, w_new, 1.7)), w_new)
    np.testing.assert_array_equal(np.asarray(fuse(w_old, w_old.copy(), 0.3)), w_old)


@pytest.mark.parametrize("fuse", [fusion.qr_fuse, fusion.svd_fuse])
def test_rank_deficient_and_zero_old_are_finite(fuse):
    rng = np.random.default_rng(5)
    low_rank = (rng.normal(size=(6, 2)) @ rng.normal(size=(2, 6))).astype(np.float32)
    w_new = rng.normal(size=(6, 6)).astype(np.float32)
    for w_old in (low_rank, np.zeros((6, 6), np.float32)):
        got = np.asarray(fuse(w_old, w_new, 0.5))
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(np.asarray(fuse(w_old, w_new, 1.0)), w_new)
    # Both all-zero: nothing changed, the old (zero) matrix comes back.
    zeros = np.zeros((4, 3), np.float32)
    np.testing.assert_array_equal(np.asarray(fuse(zeros, zeros, 0.5)), zeros)


def test_zero_old_qr_is_masked_new():
    # Documented: Householder QR of 0 gives Q = I, R = 0, so the result is M * W_new.
    w_new = np.random.default_rng(6).normal(size=(5, 7)).astype(np.float32)
    mask = np.minimum(1.0, np.abs(w_new) / np.abs(w_new).max() + 0.2)
    got = fusion.qr_fuse(np.zeros_like(w_new), w_new, 0.2)
    np.testing.assert_allclose(np.asarray(got), mask * w_new, atol=1e-6)


def np_factors(w_old, kind):
    if kind == "qr":
        return np.linalg.qr(w_old, mode="complete")
    u, s, vh = np.linalg.svd(w_old, full_matrices=False)
    return u, s[:, None] * vh  # complete for square and wide shapes


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=st.sampled_from(SHAPES[:2]),
    bias=st.floats(0.0, 0.95),
    kind=st.sampled_from(["qr", "svd"]),
)
def test_sign_flips_do_not_change_the_result(seed, shape, bias, kind):
    w_old, w_new = pair(shape, seed)
    signs = np.where(np.random.default_rng(seed + 1).random(shape[0]) < 0.5, -1.0, 1.0)
    q, r = np_factors(w_old, kind)
    plain = fusion.fuse_in_basis(q, r, w_old, w_new, bias)
    flipped = fusion.fuse_in_basis(q * signs, signs[:, None] * r, w_old, w_new, bias)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(flipped), atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from(SHAPES), bias=st.floats(0.0, 0.95))
def test_fused_coefficients_lie_between_old_and_new(seed, shape, bias):
    # Q^T W = M P + (1 - M) R with M in [b, 1]: each coefficient is a convex mix of old and new.
    w_old, w_new = pair(shape, seed, step=1.0)
    got = np.asarray(fusion.qr_fuse(w_old, w_new, bias), np.float64)
    q, r = np.linalg.qr(w_old.astype(np.float64), mode="complete")
    coeff, p = q.T @ got, q.T @ w_new
    lo, hi = np.minimum(p, r), np.maximum(p, r)
    assert np.all(coeff >= lo - 1e-4) and np.all(coeff <= hi + 1e-4)
    # b is the weight of the new value at least: M >= b.
    moved = np.abs(p - r) > 1e-3
    weight_new = (coeff - r)[moved] / (p - r)[moved]
    assert np.all(weight_new >= bias - 1e-3)


def test_qr_fuse_under_jit_and_vmap():
    stacked = [pair((6, 4), seed) for seed in range(3)]
    olds = np.stack([o for o, _ in stacked])
    news = np.stack([n for _, n in stacked])
    biases = np.array([0.0, 0.5, 1.0], np.float32)
    got = jax.jit(jax.vmap(fusion.qr_fuse))(olds, news, biases)
    for k in range(3):
        np.testing.assert_allclose(
            np.asarray(got[k]), np.asarray(fusion.qr_fuse(olds[k], news[k], biases[k])), atol=1e-6
        )
    np.testing.assert_array_equal(np.asarray(got[2]), news[2])


def head_params(seed, mode="dynamic", dim=6):
    head = CalibratedHead(dim=dim, mode=mode)
    ctx = task_context([0, 2], 0)
    return head.init(jax.random.key(seed), jnp.ones((2, dim)), ctx)["params"]


def test_fuse_params_touches_only_selected_leaves():
    old, new = head_params(0), head_params(1)
    rules = ("adapter/kernel=qr", "calib/kernel=keep_old", "calib/bias=average")
    fused = fusion.fuse_params(old, new, rules, 0.6)
    # Flax kernel = W^T: the result equals fusing W = kernel^T by hand (NumPy reference).
    w_old, w_new = np.asarray(old["adapter"]["kernel"]).T, np.asarray(new["adapter"]["kernel"]).T
    np.testing.assert_allclose(
        np.asarray(fused["adapter"]["kernel"]), np_qr_fuse(w_old, w_new, 0.6).T, atol=1e-5
    )
    np.testing.assert_array_equal(fused["calib"]["kernel"], old["calib"]["kernel"])
    expected_bias = (np.asarray(old["calib"]["bias"]) + np.asarray(new["calib"]["bias"])) / 2
    np.testing.assert_array_equal(fused["calib"]["bias"], expected_bias)
    # The rapf preset's rules: only the adapter is fused; the gate keeps its new values.
    fused = fusion.fuse_params(old, new, ("adapter/kernel=svd", "calib/.*=keep_new"), 0.6)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(fused["calib"][name], new["calib"][name])
    np.testing.assert_allclose(
        np.asarray(fused["adapter"]["kernel"]), np_svd_fuse(w_old, w_new, 0.6).T, atol=1e-5
    )


def test_fuse_params_with_params_prefix_and_plan():
    old, new = {"params": head_params(0)}, {"params": head_params(1)}
    gate_kernels = np.random.default_rng(2).normal(size=(2, 18, 1)).astype(np.float32)
    old["params"]["calib"]["kernel"], new["params"]["calib"]["kernel"] = gate_kernels
    rules = ("(.*/)?adapter/kernel=qr", "(.*/)?calib/kernel=qr", "(.*/)?calib/.*=keep_new")
    plan = fusion.fusion_plan(old, rules)
    assert plan == {
        "params/adapter/kernel": ("qr", "(.*/)?adapter/kernel"),
        "params/calib/bias": ("keep_new", "(.*/)?calib/.*"),  # the first matching rule wins
        "params/calib/kernel": ("qr", "(.*/)?calib/kernel"),
    }
    assert "params/calib/bias: keep_new (due to '(.*/)?calib/.*')" in fusion.format_plan(plan)
    fused = fusion.fuse_params(old, new, rules, 0.6)
    np.testing.assert_allclose(
        np.asarray(fused["params"]["calib"]["kernel"]),
        np_qr_fuse(
            np.asarray(old["params"]["calib"]["kernel"]).T,
            np.asarray(new["params"]["calib"]["kernel"]).T,
            0.6,
        ).T,
        atol=1e-5,
    )
    chex.assert_trees_all_equal(fusion.fuse_params(old, new, (".*=keep_new",), 0.6), new)
    # Unmatched leaves keep the new value.
    assert fusion.fusion_plan(old, ("nothing=keep_old",))["params/calib/bias"] == ("keep_new", None)
    fused = fusion.fuse_params(old, new, ("nothing=keep_old",), 0.6)
    chex.assert_trees_all_equal(fused, new)


def test_fuse_params_traces_once_across_tasks(monkeypatch):
    counted = chex.assert_max_traces(fusion._fuse_tree, n=1)
    monkeypatch.setattr(fusion, "_fuse_tree", counted)
    fusion._jitted_fuse_tree.cache_clear()
    try:
        params = head_params(0)
        for task, bias in enumerate([0.6, 0.5, 0.7, np.float32(0.8)]):
            params = fusion.fuse_params(params, head_params(task + 1), ("adapter/kernel=qr",), bias)
    finally:
        fusion._jitted_fuse_tree.cache_clear()
    assert np.isfinite(np.asarray(params["adapter"]["kernel"])).all()


def test_fuse_params_bad_input():
    old, new = head_params(0, mode="learned"), head_params(1, mode="learned")
    with pytest.raises(ValueError, match="2-D leaf"):
        fusion.fuse_params(old, new, (".*=qr",), 0.5)
    with pytest.raises(ValueError, match=r"'adapter/kernel=fuse' must read 'path_regex=action'"):
        fusion.fuse_params(old, new, ("adapter/kernel=fuse",), 0.5)
    with pytest.raises(ValueError, match="must read 'path_regex=action'"):
        fusion.parse_rules(("adapter/kernel",))
    with pytest.raises(ValueError, match=r"bad path regex 'adapter/\(kernel'"):
        fusion.parse_rules(("adapter/(kernel=qr",))
    with pytest.raises(ValueError, match="a sequence of 'regex=action' strings"):
        fusion.parse_rules("adapter/kernel=qr")
    with pytest.raises(ValueError, match="structure"):
        fusion.fuse_params(old, head_params(1, mode="dynamic"), (), 0.5)
    with pytest.raises(ValueError, match="same shape"):
        fusion.qr_fuse(jnp.ones((3, 3)), jnp.ones((3, 4)), 0.5)
