"""Nearest class mean on the frozen features (SimpleCIL, Zhou et al., IJCV 2024), and its CLIP
variant that also scores the class text embeddings.

SimpleCIL's prototype of a class is the mean of its frozen training embeddings, and an image goes
to the seen class whose prototype is the most cosine-similar. The task loop keeps exactly these
means (`TaskInputs.means`, one row per class position, filled before a task is evaluated), so
the method has no parameters and no training steps. `ncm+text` scores
`(1 - w) cos(f, mean_c) + w cos(f, text_c)`, with w = `config.ncm.text_weight`.
"""

from __future__ import annotations

import dataclasses

import jax

from calfuse_jax.calibration import normalize


def ncm_logits(f0: jax.Array, means: jax.Array, text: jax.Array, text_weight: float) -> jax.Array:
    """[B, C] `(1 - w) cos(f0, means_c) + w cos(f0, text_c)` for f0 [B, D], means and text
    [C, D] (a zero mean row scores 0 on its part)."""
    image = normalize(f0)
    return (1.0 - text_weight) * image @ normalize(means).T + text_weight * image @ text.T


@dataclasses.dataclass(frozen=True)
class NearestClassMean:
    """SimpleCIL (text_weight 0) or ncm+text; see the module docstring."""

    text_weight: float = 0.0
    trains = False  # the loop runs no steps and no fusion
    fusion_rules = ()

    @classmethod
    def build(cls, config, dim, logit_scale, num_classes):
        return cls(float(config.ncm.text_weight))

    def init(self, key):
        return {}

    def logits(self, params, f0, inputs):
        return ncm_logits(f0, inputs.means, inputs.text, self.text_weight)
