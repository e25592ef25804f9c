"""Per-class Gaussian statistics of frozen features, pseudo-feature sampling and hard pairs.

Old classes have no stored images (DESIGN.md §2): after each task we keep, per class c, the mean
`mu_c` and covariance `Sigma_c = cov_c + eps * I` of its frozen features `f0` (optionally shrunk),
and its Cholesky factor `L_c` (computed once, `Sigma_c = L_c L_c^T`). Later tasks draw
pseudo-features `mu_c + L_c z`, `z ~ N(0, I)`. `ClassStats` grows by task without recomputing old
classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def _check_counts(labels, class_ids) -> None:
    """Host-side check that every class has >= 2 samples (skipped under jit)."""
    if isinstance(labels, jax.core.Tracer) or isinstance(class_ids, jax.core.Tracer):
        return
    labels, class_ids = np.asarray(labels), np.asarray(class_ids)
    counts = (labels[None, :] == class_ids[:, None]).sum(axis=1)
    few = class_ids[counts < 2]
    if few.size:
        raise ValueError(
            f"classes {few[:10].tolist()} have fewer than 2 samples; a covariance needs at least 2 "
            "(check that labels are positions and class_ids are the task's positions)"
        )


def shrink(cov: jax.Array) -> jax.Array:
    """Covariance shrinkage (RAPF): `Sigma + mean(diag) * I + mean(offdiag) * (11^T - I)`.

    `mean(offdiag)` is the mean of the D(D-1) off-diagonal entries.

    Args:
      cov: [..., D, D] covariances.

    Returns:
      [..., D, D] shrunk covariances.
    """
    dim = cov.shape[-1]
    eye = jnp.eye(dim, dtype=cov.dtype)
    diag = jnp.diagonal(cov, axis1=-2, axis2=-1)  # [..., D]
    diag_mean = jnp.mean(diag, axis=-1)[..., None, None]
    off_sum = jnp.sum(cov, axis=(-2, -1)) - jnp.sum(diag, axis=-1)
    off_mean = (off_sum / max(dim * (dim - 1), 1))[..., None, None]
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
    then (optionally) `shrink`. Classes are processed one at a time (`lax.map`) so memory stays
    [N, D], not [K, N, D].

    Args:
      features: [N, D] frozen features f0.
      labels: int [N] class positions.
      class_ids: int [K] the classes to summarise (each needs >= 2 samples).
      eps: ridge added to the diagonal.
      shrinkage: apply `shrink` after the ridge.

    Returns:
      (means [K, D], covs [K, D, D]), float32.
    """
    _check_counts(labels, class_ids)
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels)
    dim = features.shape[1]

    def one_class(class_id):
        weight = (labels == class_id).astype(jnp.float32)  # [N]
        count = jnp.sum(weight)
        mean = weight @ features / count  # [D]
        centred = (features - mean) * weight[:, None]  # [N, D], zero outside the class
        cov = centred.T @ centred / (count - 1.0)  # [D, D]
        return mean, cov + eps * jnp.eye(dim, dtype=jnp.float32)

    means, covs = jax.lax.map(one_class, jnp.asarray(class_ids))
    if shrinkage:
        covs = shrink(covs)
    return means, covs


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

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @classmethod
    def empty(cls, dim: int) -> ClassStats:
        """No classes yet: means [0, D], chols [0, D, D]."""
        return cls(jnp.zeros((0, dim), jnp.float32), jnp.zeros((0, dim, dim), jnp.float32))

    def extend(self, new_means: jax.Array, new_chols: jax.Array) -> ClassStats:
        """Appends the next task's classes (positions C..C+K-1) without touching old ones.

        Args:
          new_means: [K, D]; new_chols: [K, D, D].
        """
        dim = self.means.shape[1]
        if new_means.ndim != 2 or new_means.shape[1] != dim:
            raise ValueError(f"new_means must be [K, {dim}], got {new_means.shape}")
        if new_chols.shape != (new_means.shape[0], dim, dim):
            raise ValueError(f"new_chols must be [{new_means.shape[0]}, {dim}, {dim}]")
        return ClassStats(
            jnp.concatenate([self.means, jnp.asarray(new_means, self.means.dtype)]),
            jnp.concatenate([self.chols, jnp.asarray(new_chols, self.chols.dtype)]),
        )

    def to_dict(self) -> dict[str, np.ndarray]:
        """NumPy arrays for checkpointing."""
        return {"means": np.asarray(self.means), "chols": np.asarray(self.chols)}

    @classmethod
    def from_dict(cls, data: dict) -> ClassStats:
        """Inverse of `to_dict`."""
        return cls(jnp.asarray(data["means"]), jnp.asarray(data["chols"]))


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
