"""Per-class Gaussian statistics of frozen features, pseudo-feature sampling and hard pairs.

Old classes have no stored images (DESIGN.md §2): after each task we keep, per class c, the mean
`mu_c` and covariance `Sigma_c = cov_c + eps * I` of its frozen features `f0` (optionally shrunk),
and its Cholesky factor `L_c` (computed once, `Sigma_c = L_c L_c^T`). Later tasks draw
pseudo-features `mu_c + L_c z`, `z ~ N(0, I)`; old classes' statistics are never recomputed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def shrink(cov: jax.Array) -> jax.Array:
    """Covariance shrinkage (RAPF's `shrink_cov`): `Sigma + mean(diag) * I + m_off * (11^T - I)`.

    `m_off` is the mean of the *nonzero* off-diagonal entries, as RAPF computes it (its mask is
    `offdiag != 0`); it equals the mean of all D(D-1) entries unless some are exactly zero. With
    no nonzero off-diagonal entry (a diagonal covariance) `m_off = 0`, where RAPF's 0 / 0 gives NaN.

    Args:
      cov: [..., D, D] covariances.

    Returns:
      [..., D, D] shrunk covariances.
    """
    dim = cov.shape[-1]
    eye = jnp.eye(dim, dtype=cov.dtype)
    diag_mean = jnp.mean(jnp.diagonal(cov, axis1=-2, axis2=-1), axis=-1)[..., None, None]
    off = cov * (1.0 - eye)
    nonzero = jnp.sum(off != 0, axis=(-2, -1)).astype(cov.dtype)
    off_mean = (jnp.sum(off, axis=(-2, -1)) / jnp.maximum(nonzero, 1.0))[..., None, None]
    return cov + diag_mean * eye + off_mean * (1.0 - eye)


def class_stats(
    features: jax.Array,
    labels: jax.Array,
    class_ids: jax.Array,
    eps: float = 1e-4,
    shrinkage: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Mean and covariance of each class's features.

    The covariance follows `numpy.cov(x, rowvar=False)` (divides by n - 1), then adds `eps * I`,
    then (optionally) `shrink`. With concrete inputs (the usual call) the rows are sorted by label
    once and each class is summarised from its own rows only, padded into [K, n, D] blocks (n = the
    largest class rounded up to 64, so equal-sized tasks share one compile): O(N D^2) in all. Under
    `jax.jit` (traced labels) every class scans all N rows instead (`lax.map`, O(K N D^2), memory
    [N, D]); the numbers are the same.

    Args:
      features: [N, D] frozen features f0.
      labels: int [N] class positions.
      class_ids: int [K] the classes to summarise (each needs >= 2 samples).
      eps: ridge added to the diagonal.
      shrinkage: apply `shrink` after the ridge.

    Returns:
      (means [K, D], covs [K, D, D]), float32.
    """
    if any(isinstance(x, jax.core.Tracer) for x in (features, labels, class_ids)):
        return _scanned_stats(features, labels, class_ids, eps, shrinkage)
    blocks, weights = _class_blocks(np.asarray(features), np.asarray(labels), np.asarray(class_ids))
    return _blocked_stats(blocks, weights, float(eps), bool(shrinkage))


def _class_blocks(features, labels, class_ids, multiple: int = 64):
    """Each class's rows grouped into blocks [K, n, D] with weights [K, n] (0 on padding).

    Raises ValueError when a class has fewer than 2 rows (no covariance).
    """
    labels, class_ids = labels.reshape(-1), class_ids.reshape(-1)
    order = np.argsort(labels, kind="stable")  # sort once; each class is then one slice
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, class_ids, side="left")
    counts = np.searchsorted(sorted_labels, class_ids, side="right") - starts
    few = class_ids[counts < 2]
    if few.size:
        raise ValueError(
            f"classes {few[:10].tolist()} have fewer than 2 samples; a covariance needs at least 2 "
            "(check that labels are positions and class_ids are the task's positions)"
        )
    size = -(-int(counts.max(initial=2)) // multiple) * multiple
    blocks = np.zeros((len(class_ids), size, features.shape[1]), np.float32)
    weights = np.zeros((len(class_ids), size), np.float32)
    for k, (start, count) in enumerate(zip(starts, counts, strict=True)):
        blocks[k, :count] = features[order[start : start + count]]
        weights[k, :count] = 1.0
    return blocks, weights


def _moments(rows: jax.Array, weights: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """(mean [D], covariance + eps I [D, D]) of the rows [n, D] with weight 1 (0: not counted)."""
    count = jnp.sum(weights)
    mean = weights @ rows / count  # [D]
    centred = (rows - mean) * weights[:, None]  # [n, D], zero outside the class
    cov = centred.T @ centred / (count - 1.0)  # [D, D]
    return mean, cov + eps * jnp.eye(rows.shape[1], dtype=rows.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "shrinkage"))
def _blocked_stats(blocks, weights, eps: float, shrinkage: bool):
    means, covs = jax.vmap(_moments, in_axes=(0, 0, None))(blocks, weights, eps)
    return means, shrink(covs) if shrinkage else covs


def _scanned_stats(features, labels, class_ids, eps: float, shrinkage: bool):
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels)

    def one_class(class_id):
        return _moments(features, (labels == class_id).astype(jnp.float32), eps)

    means, covs = jax.lax.map(one_class, jnp.asarray(class_ids))
    return means, shrink(covs) if shrinkage else covs


def cholesky_factors(covs: jax.Array) -> jax.Array:
    """Lower Cholesky factors `L` with `Sigma = L L^T`.

    Args:
      covs: [K, D, D] symmetric positive-definite covariances (the `eps * I` ridge of
        `class_stats` makes them so even for fewer samples than dimensions).

    Returns:
      [K, D, D] lower-triangular factors (NaN only for a covariance that is not positive-definite).
    """
    return jnp.linalg.cholesky(covs)


@struct.dataclass
class ClassStats:
    """Stored statistics of every class seen so far, by position (a pytree).

    Attributes:
      means: [C, D] class means for positions 0..C-1.
      chols: [C, D, D] Cholesky factors of the class covariances.
    """

    means: jax.Array
    chols: jax.Array


def sample_pseudo(
    key: jax.Array,
    means: jax.Array,
    chols: jax.Array,
    class_ids: jax.Array,
    samples_per_class: int,
) -> tuple[jax.Array, jax.Array]:
    """Draws `samples_per_class` Gaussian pseudo-features for each class in `class_ids`.

    `x = mu_c + L_c z` with `z ~ N(0, I)`, so `cov(x) = L_c L_c^T = Sigma_c`. Jit-friendly
    (`samples_per_class` must be static; `class_ids` may be traced).

    Args:
      key: PRNG key.
      means: [C, D] stored class means (positions 0..C-1).
      chols: [C, D, D] stored Cholesky factors.
      class_ids: int [K] positions to sample (repeats allowed, e.g. hard-pair old classes).
      samples_per_class: n.

    Returns:
      (features [K * n, D], labels int32 [K * n]); samples of class_ids[k] are rows k*n..k*n+n-1.
    """
    class_ids = jnp.asarray(class_ids, jnp.int32)
    num = class_ids.shape[0]
    dim = means.shape[1]
    noise = jax.random.normal(key, (num, samples_per_class, dim), means.dtype)  # [K, n, D]
    picked_chols = chols[class_ids]  # [K, D, D]
    samples = means[class_ids][:, None, :] + jnp.einsum("knj,kij->kni", noise, picked_chols)
    labels = jnp.repeat(class_ids, samples_per_class, total_repeat_length=num * samples_per_class)
    return samples.reshape(num * samples_per_class, dim), labels


def hard_pairs(text_features, old_ids, new_ids, threshold: float) -> np.ndarray:
    """Pairs of an old and a new class whose text embeddings are close (host-side, NumPy).

    Args:
      text_features: [C, D] unit-norm text embeddings by position.
      old_ids: int [O] old class positions.
      new_ids: int [N] new class positions.
      threshold: a pair is hard when `||T_j - T_i|| < threshold`.

    Returns:
      int64 [P, 2] rows `(old i, new j)`, sorted by i then j; [0, 2] when there are none.
    """
    text = np.asarray(text_features, np.float64)
    old_ids = np.asarray(old_ids, np.int64).reshape(-1)
    new_ids = np.asarray(new_ids, np.int64).reshape(-1)
    if old_ids.size == 0 or new_ids.size == 0:
        return np.zeros((0, 2), np.int64)
    dist = np.linalg.norm(text[old_ids][:, None, :] - text[new_ids][None, :, :], axis=-1)
    rows, cols = np.nonzero(dist < threshold)  # row-major: sorted by old, then new
    return np.stack([old_ids[rows], new_ids[cols]], axis=1).astype(np.int64)


def task_hard_pairs(text: np.ndarray, bounds, pseudo) -> tuple[np.ndarray, np.ndarray]:
    """(pairs int32 [T, P, 2], mask float32 [T, P]): each task's hard pairs (old, new), padded
    to the largest count so that every task has one shape; none on task 0 or with the hinge off
    (`pseudo.hard_weight` 0), and P = 0 when no task has any (the step then skips the hinge)."""
    threshold, on = float(pseudo.hard_threshold), float(pseudo.hard_weight) > 0
    found = [
        hard_pairs(text, np.arange(old), np.arange(old, seen), threshold)
        if on
        else np.zeros((0, 2), np.int64)
        for old, seen in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    size = max(len(p) for p in found)
    pairs = np.zeros((len(found), size, 2), np.int32)
    mask = np.zeros((len(found), size), np.float32)
    for task, task_pairs in enumerate(found):
        pairs[task, : len(task_pairs)], mask[task, : len(task_pairs)] = task_pairs, 1.0
    return pairs, mask
