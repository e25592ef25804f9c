"""Nearest class mean on the frozen features (SimpleCIL, Zhou et al., IJCV 2024), and `ncm+text`,
which scores `(1 - w) cos(f, mean_c) + w cos(f, text_c)` (w = `config.ncm.text_weight`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from calfuse_jax.calibration import normalize


def ncm_logits(f0: jax.Array, means: jax.Array, text: jax.Array, text_weight: float) -> jax.Array:
    """[B, C] `(1 - w) cos(f0, means_c) + w cos(f0, text_c)`; f0 [B, D], means and text [C, D]."""
    image = normalize(f0)
    return (1.0 - text_weight) * image @ normalize(means).T + text_weight * image @ text.T


@dataclasses.dataclass(frozen=True)
class NearestClassMean:
    """SimpleCIL (text_weight 0) or ncm+text: prototypes [C, D] of unit features, no training."""

    dim: int
    num_classes: int
    text_weight: float = 0.0
    trains = False  # the loop runs no steps and no fusion
    fusion_rules = ()

    @classmethod
    def build(cls, config, dim, logit_scale, num_classes):
        return cls(dim, num_classes, float(config.ncm.text_weight))

    def init(self, key):
        return {"prototypes": jnp.zeros((self.num_classes, self.dim))}

    def update(self, params, features, labels, rng, inputs):
        """Sets the prototypes of the classes in `labels` (int [N]) from features [N, D]."""
        ids, index = np.unique(labels, return_inverse=True)
        unit = np.asarray(normalize(jnp.asarray(features, jnp.float32)))
        sums = np.zeros((len(ids), unit.shape[1]), np.float64)
        np.add.at(sums, index, unit)
        means = (sums / np.bincount(index)[:, None]).astype(np.float32)
        return {"prototypes": params["prototypes"].at[ids].set(means)}

    def logits(self, params, f0, inputs):
        return ncm_logits(f0, params["prototypes"], inputs.text, self.text_weight)
