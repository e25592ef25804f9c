"""FeCAM (Goswami et al., NeurIPS 2023): Mahalanobis distance to per-class Gaussians, no training.

CLIP features are signed, so Tukey's x^beta is `sign(x) |x|^beta` (`config.fecam.tukey`, 1 = off).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from calfuse_jax import stats
from calfuse_jax.calibration import normalize


def tukey(x: jax.Array, beta: float) -> jax.Array:
    """`sign(x) |x|^beta` elementwise (beta = 1: x unchanged)."""
    return x if beta == 1.0 else jnp.sign(x) * jnp.abs(x) ** beta


@jax.jit
def precisions(covs: jax.Array) -> jax.Array:
    """[K, D, D] pinv of the shrunk covariances [K, D, D] normalised to correlation matrices."""
    shrunk = stats.shrink(covs)
    sd = jnp.sqrt(jnp.diagonal(shrunk, axis1=-2, axis2=-1))  # [K, D]
    return jnp.linalg.pinv(shrunk / (sd[:, :, None] * sd[:, None, :]))


def fecam_logits(x: jax.Array, means: jax.Array, precisions: jax.Array) -> jax.Array:
    """[B, C] -Mahalanobis distances of unit x [B, D] to unit means [C, D], precisions [C, D, D]."""
    diff = normalize(x)[:, None, :] - normalize(means)[None]  # [B, C, D]
    return -jnp.einsum("bcd,cde,bce->bc", diff, precisions, diff)


@dataclasses.dataclass(frozen=True)
class FeCAM:
    dim: int
    num_classes: int
    beta: float = 1.0  # Tukey power; 1 = off
    trains = False
    fusion_rules = ()

    @classmethod
    def build(cls, config, dim, logit_scale, num_classes):
        return cls(dim, num_classes, float(config.fecam.tukey))

    def init(self, key):
        c, d = self.num_classes, self.dim
        return {"means": jnp.zeros((c, d)), "precisions": jnp.zeros((c, d, d))}

    def update(self, params, features, labels, rng, inputs):
        """Sets the statistics of the classes in `labels` (int [N]) from features [N, D]."""
        ids = np.unique(labels)
        x = np.asarray(tukey(jnp.asarray(features, jnp.float32), self.beta))
        means, covs = stats.class_stats(x, labels, ids, eps=0.0)
        return {
            "means": params["means"].at[ids].set(means),
            "precisions": params["precisions"].at[ids].set(precisions(covs)),
        }

    def logits(self, params, f0, inputs):
        return fecam_logits(tukey(f0, self.beta), params["means"], params["precisions"])
