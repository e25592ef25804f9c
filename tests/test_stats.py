"""Class statistics against numpy.cov/numpy.mean; sampling checked against its known Gaussian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calfuse_jax import stats


def labelled_features(seed=0, dim=5, per_class=(12, 7, 30)):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(per_class)), per_class)
    rng.shuffle(labels)  # classes interleaved, as in a real task
    feats = rng.normal(size=(len(labels), dim)) * rng.uniform(0.5, 2.0, size=dim) + labels[:, None]
    return feats.astype(np.float32), labels


@pytest.mark.parametrize("shrinkage", [False, True])
def test_class_stats_match_numpy(shrinkage):
    feats, labels = labelled_features()
    class_ids = np.array([2, 0])
    means, covs = stats.class_stats(feats, labels, class_ids, eps=1e-4, shrinkage=shrinkage)
    for k, c in enumerate(class_ids):
        x = feats[labels == c].astype(np.float64)
        cov = np.cov(x, rowvar=False) + 1e-4 * np.eye(x.shape[1])
        if shrinkage:
            cov = np_shrink(cov)
        np.testing.assert_allclose(np.asarray(means[k]), x.mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(np.asarray(covs[k]), cov, atol=1e-5)


def test_class_stats_under_jit():
    feats, labels = labelled_features(1)
    jitted = jax.jit(stats.class_stats, static_argnames=("shrinkage",))
    means, covs = jitted(feats, labels, jnp.array([0, 1, 2]))
    eager_means, eager_covs = stats.class_stats(feats, labels, np.array([0, 1, 2]))
    np.testing.assert_allclose(np.asarray(means), np.asarray(eager_means), atol=1e-6)
    np.testing.assert_allclose(np.asarray(covs), np.asarray(eager_covs), atol=1e-6)


def test_fast_path_equals_scan_and_numpy_on_unsorted_interleaved_labels():
    # Labels are unsorted, interleaved, not contiguous (positions 4..7) and of unequal counts, so
    # the sort-once grouping and the padding of the per-class blocks are both exercised; the
    # traced path (every class scans all rows) and numpy.cov are the two independent references.
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat([4, 5, 6, 7], [10, 7, 13, 70]))
    features = (rng.standard_normal((len(labels), 6)) * 3 + labels[:, None]).astype(np.float32)
    ids = np.array([7, 5, 6])  # not in label order either
    scanned = jax.jit(stats.class_stats, static_argnames=("shrinkage",))
    for shrinkage in (False, True):
        means, covs = stats.class_stats(features, labels, ids, 1e-4, shrinkage)
        ref_means, ref_covs = scanned(features, labels, jnp.asarray(ids), 1e-4, shrinkage)
        np.testing.assert_allclose(means, ref_means, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(covs, ref_covs, rtol=1e-4, atol=1e-4)
        for k, class_id in enumerate(ids):
            rows = features[labels == class_id].astype(np.float64)
            cov = np.cov(rows, rowvar=False) + 1e-4 * np.eye(6)
            cov = np_shrink(cov) if shrinkage else cov
            np.testing.assert_allclose(means[k], rows.mean(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(covs[k], cov, rtol=1e-4, atol=1e-4)


def np_shrink(cov):
    # RAPF's shrink_cov written entry by entry, independently of the vectorised version: the
    # off-diagonal mean runs over the nonzero off-diagonal entries only (its `off_diag != 0` mask).
    dim = cov.shape[0]
    diag_mean = np.mean([cov[i, i] for i in range(dim)])
    off = [cov[i, j] for i in range(dim) for j in range(dim) if i != j and cov[i, j] != 0]
    off_mean = np.mean(off) if off else 0.0
    out = cov.copy()
    for i in range(dim):
        for j in range(dim):
            out[i, j] += diag_mean if i == j else off_mean
    return out


def test_shrink_formula_batched():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 4, 4))
    covs = a @ a.transpose(0, 2, 1)
    got = np.asarray(stats.shrink(jnp.asarray(covs, jnp.float32)))
    for k in range(3):
        np.testing.assert_allclose(got[k], np_shrink(covs[k]), rtol=1e-5, atol=1e-5)


def test_shrink_off_diagonal_mean_skips_exact_zeros_as_rapf_does():
    # Two uncorrelated blocks: 8 of the 12 off-diagonal entries are exactly 0. RAPF averages the
    # 4 nonzero ones (mean 0.5); the mean of all 12 would be 1/6.
    cov = np.zeros((4, 4))
    cov[:2, :2] = [[2.0, 0.3], [0.3, 1.0]]
    cov[2:, 2:] = [[3.0, 0.7], [0.7, 2.0]]
    got = np.asarray(stats.shrink(jnp.asarray(cov, jnp.float32)))
    np.testing.assert_allclose(got, np_shrink(cov), rtol=1e-6)
    assert got[0, 2] == pytest.approx(0.5) and got[0, 0] == pytest.approx(2.0 + 2.0)
    # A diagonal covariance has no nonzero off-diagonal entry: nothing is added there (RAPF: NaN).
    diagonal = np.asarray(stats.shrink(jnp.diag(jnp.array([1.0, 3.0]))))
    np.testing.assert_array_equal(diagonal, [[3.0, 0.0], [0.0, 5.0]])


def test_class_with_one_sample_is_rejected():
    feats, labels = labelled_features()
    labels[labels == 1] = 0
    labels[0] = 1  # class 1 now has a single sample
    with pytest.raises(ValueError, match=r"classes \[1\] have fewer than 2 samples"):
        stats.class_stats(feats, labels, np.array([1]))
    with pytest.raises(ValueError, match=r"classes \[9\] have fewer than 2 samples"):
        stats.class_stats(feats, labels, np.array([0, 9]))  # a class with no rows at all


def test_cholesky_factors_reconstruct():
    _, covs = stats.class_stats(*labelled_features(3), np.array([0, 1, 2]))
    chols = np.asarray(stats.cholesky_factors(covs), np.float64)
    np.testing.assert_allclose(chols @ chols.transpose(0, 2, 1), np.asarray(covs), atol=1e-5)
    assert np.allclose(chols, np.tril(chols))


def test_sample_pseudo_mean_and_cov_within_sampling_error():
    # Known Gaussian; tolerances are 5 standard errors of the estimators for n samples:
    # mean_i: sqrt(S_ii / n); cov_ij (Wishart): sqrt((S_ij^2 + S_ii S_jj) / (n - 1)).
    rng = np.random.default_rng(4)
    dim, n = 4, 20_000
    a = rng.normal(size=(dim, dim))
    sigma = a @ a.T + 0.5 * np.eye(dim)
    mu = rng.normal(size=dim) * 3
    means = np.stack([np.zeros(dim), mu]).astype(np.float32)
    chols = np.stack([np.eye(dim), np.linalg.cholesky(sigma)]).astype(np.float32)
    sample = jax.jit(stats.sample_pseudo, static_argnames="samples_per_class")
    feats, labels = sample(jax.random.key(0), means, chols, jnp.array([1, 0]), samples_per_class=n)
    assert feats.shape == (2 * n, dim) and labels.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(labels), np.repeat([1, 0], n))
    x = np.asarray(feats[:n], np.float64)
    mean_err = np.abs(x.mean(axis=0) - mu)
    assert np.all(mean_err < 5 * np.sqrt(np.diag(sigma) / n)), mean_err
    cov_tol = 5 * np.sqrt((sigma**2 + np.outer(np.diag(sigma), np.diag(sigma))) / (n - 1))
    assert np.all(np.abs(np.cov(x, rowvar=False) - sigma) < cov_tol)
    # Different keys give different draws; the same key the same draws.
    again, _ = sample(jax.random.key(0), means, chols, jnp.array([1, 0]), samples_per_class=n)
    other, _ = sample(jax.random.key(1), means, chols, jnp.array([1, 0]), samples_per_class=n)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(feats))
    assert not np.allclose(np.asarray(other), np.asarray(feats))


def test_hard_pairs_by_hand():
    # Unit vectors at known distances: ||e0 - e1|| = sqrt(2) ~ 1.414, text 3 is 0.1 from text 0.
    text = np.zeros((4, 3))
    text[0], text[1], text[2] = [1, 0, 0], [0, 1, 0], [0, 0, 1]
    text[3] = [np.cos(0.1), np.sin(0.1), 0]  # chord length 2 sin(0.05) ~ 0.0999
    pairs = stats.hard_pairs(text, old_ids=[0, 1], new_ids=[2, 3], threshold=0.5)
    np.testing.assert_array_equal(pairs, [[0, 3]])
    pairs = stats.hard_pairs(text, old_ids=[0, 1], new_ids=[2, 3], threshold=1.5)
    np.testing.assert_array_equal(pairs, [[0, 2], [0, 3], [1, 2], [1, 3]])
    assert stats.hard_pairs(text, [0], [2], 1.0).shape == (0, 2)
    assert stats.hard_pairs(text, [], [2], 1.0).shape == (0, 2)
