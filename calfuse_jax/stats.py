"""Per-class Gaussian statistics of frozen features, pseudo-feature sampling and hard pairs.

Per class: the mean `mu_c` and the Cholesky factor `L_c` of its covariance + `eps I`; later tasks
draw pseudo-features `mu_c + L_c z` (DESIGN.md §2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def shrink(cov: jax.Array) -> jax.Array:
    """RAPF's `shrink_cov` of [..., D, D]: `Sigma + mean(diag) I + m_off (11^T - I)`, `m_off` the
    mean of the nonzero off-diagonal entries (as RAPF's mask; 0 where there are none, not NaN)."""
    eye = jnp.eye(cov.shape[-1], dtype=cov.dtype)
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
    """(means [K, D], covs [K, D, D]) float32 of features [N, D] with positions int [N], for each
    class of `class_ids` int [K] (>= 2 rows each): `numpy.cov` (n - 1), plus `eps * I`, then
    `shrink` if `shrinkage`. Traced inputs scan all N rows per class, to the same numbers."""
    if any(isinstance(x, jax.core.Tracer) for x in (features, labels, class_ids)):
        features, labels = jnp.asarray(features, jnp.float32), jnp.asarray(labels)

        def one_class(class_id):
            return _moments(features, (labels == class_id).astype(jnp.float32), eps)

        means, covs = jax.lax.map(one_class, jnp.asarray(class_ids))
        return means, shrink(covs) if shrinkage else covs
    blocks, weights = _class_blocks(np.asarray(features), np.asarray(labels), np.asarray(class_ids))
    return _blocked_stats(blocks, weights, float(eps), bool(shrinkage))


def _class_blocks(features, labels, class_ids, multiple: int = 64):
    """Each class's rows as blocks [K, n, D] with weights [K, n] (0 on padding)."""
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
    for k, (start, count) in enumerate(zip(starts, counts, strict=True)):
        blocks[k, :count] = features[order[start : start + count]]
    return blocks, (np.arange(size) < counts[:, None]).astype(np.float32)


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


def cholesky_factors(covs: jax.Array) -> jax.Array:
    """Lower factors [K, D, D] with `Sigma = L L^T` (NaN for a covariance that is not PD)."""
    return jnp.linalg.cholesky(covs)


@struct.dataclass
class ClassStats:
    """Statistics of every class seen so far, by position: means [C, D], chols [C, D, D]."""

    means: jax.Array
    chols: jax.Array


def sample_pseudo(
    key: jax.Array, means: jax.Array, chols: jax.Array, class_ids: jax.Array, samples_per_class: int
) -> tuple[jax.Array, jax.Array]:
    """(features [K * n, D], labels int32 [K * n]): n = `samples_per_class` (static) draws
    `mu_c + L_c z` for each c of `class_ids` int [K] (may be traced), in rows k*n..k*n+n-1."""
    class_ids = jnp.asarray(class_ids, jnp.int32)
    num, dim = class_ids.shape[0], means.shape[1]
    noise = jax.random.normal(key, (num, samples_per_class, dim), means.dtype)  # [K, n, D]
    picked_chols = chols[class_ids]  # [K, D, D]
    samples = means[class_ids][:, None, :] + jnp.einsum("knj,kij->kni", noise, picked_chols)
    labels = jnp.repeat(class_ids, samples_per_class, total_repeat_length=num * samples_per_class)
    return samples.reshape(num * samples_per_class, dim), labels


def hard_pairs(text_features, old_ids, new_ids, threshold: float) -> np.ndarray:
    """int64 [P, 2] rows `(old i, new j)`, sorted by i then j ([0, 2] when none), of the old
    positions `old_ids` int [O] and new `new_ids` int [N] whose unit text embeddings
    `text_features` [C, D] are close: `||T_j - T_i|| < threshold` (host-side, NumPy)."""
    text = np.asarray(text_features, np.float64)
    old_ids = np.asarray(old_ids, np.int64).reshape(-1)
    new_ids = np.asarray(new_ids, np.int64).reshape(-1)
    dist = np.linalg.norm(text[old_ids][:, None, :] - text[new_ids][None, :, :], axis=-1)
    rows, cols = np.nonzero(dist < threshold)  # row-major: sorted by old, then new
    return np.stack([old_ids[rows], new_ids[cols]], axis=1).astype(np.int64)


def task_hard_pairs(text: np.ndarray, bounds, pseudo) -> tuple[np.ndarray, np.ndarray]:
    """(pairs int32 [T, P, 2], mask float32 [T, P]): each task's hard pairs, padded to the
    largest count; none with `pseudo.hard_weight` 0, and P = 0 when no task has any."""
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
