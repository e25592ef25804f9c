"""Losses of one task (DESIGN.md §2): seen-class cross-entropy, hard-pair hinge, distillation.

Logits always cover every class position the text features have ([B, C]); `num_seen` masks the
positions not seen yet, so one jitted step serves every task (C fixed, `num_seen` traced). Row
masks `[B]` let padded batches keep a fixed shape; every loss is the mask-weighted mean over rows
(0 when no row is valid).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Large but finite: exp() underflows to exactly 0, and 0 * (finite) keeps gradients NaN-free.
_MASKED_LOGIT = -1e9


def _class_mask(num_classes: int, num_seen) -> jax.Array | None:
    if num_seen is None:
        return None
    return jnp.arange(num_classes) < num_seen  # [C]


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of `values` [B] weighted by `mask` [B]; 0 for an all-zero mask."""
    if mask is None:
        return jnp.mean(values)
    weight = jnp.asarray(mask, values.dtype)
    return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1e-12)


def _masked_log_softmax(logits: jax.Array, num_seen) -> jax.Array:
    valid = _class_mask(logits.shape[-1], num_seen)
    if valid is not None:
        logits = jnp.where(valid, logits, _MASKED_LOGIT)
    return jax.nn.log_softmax(logits, axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_seen=None, mask=None) -> jax.Array:
    """Softmax cross-entropy over the seen classes.

    Args:
      logits: [B, C] logits over all class positions.
      labels: int [B] positions; must be < num_seen for valid rows.
      num_seen: classes `>= num_seen` are excluded from the softmax (None: all C). May be traced.
      mask: optional [B] row weights (1 valid, 0 padding).

    Returns:
      scalar: `mean_b -log softmax(z_b)[y_b]` over valid rows.
    """
    log_probs = _masked_log_softmax(logits.astype(jnp.float32), num_seen)  # [B, C]
    nll = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return _masked_mean(nll, mask)


def hinge_loss(
    features: jax.Array,
    text_own: jax.Array,
    text_other: jax.Array,
    margin: float = 0.1,
    mask=None,
) -> jax.Array:
    """Hard-pair hinge: `mean relu(<f, T_j> - <f, T_i> + margin)`.

    Pushes pseudo-features of old class i towards their own text embedding T_i and away from the
    confusable new class j.

    Args:
      features: [B, D] calibrated (unit-norm) features of old-class samples.
      text_own: [B, D] text embedding T_i of each sample's own class.
      text_other: [B, D] text embedding T_j of the paired new class.
      margin: hinge margin.
      mask: optional [B] row weights.

    Returns:
      scalar loss.
    """
    own = jnp.sum(features * text_own, axis=-1)  # [B]
    other = jnp.sum(features * text_other, axis=-1)  # [B]
    return _masked_mean(jax.nn.relu(other - own + margin), mask)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 2.0,
    num_seen=None,
    mask=None,
    weight: float = 1.0,
) -> jax.Array:
    """Knowledge distillation `weight * T^2 * KL(p_teacher || p_student)`, p = softmax(z / T).

    The teacher is the previous task's model (gradients are stopped through it); typically applied
    to pseudo-features of old classes with `num_seen` = the number of old classes, so only the
    classes the teacher knows take part.

    Args:
      student_logits: [B, C] current model's logits.
      teacher_logits: [B, C] previous model's logits.
      temperature: T.
      num_seen: classes `>= num_seen` are excluded from both softmaxes.
      mask: optional [B] row weights.
      weight: loss weight (lambda_kd); 0 gives 0.

    Returns:
      scalar: `weight * T^2 * mean_b sum_c p_t (log p_t - log p_s)`.
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    log_student = _masked_log_softmax(student_logits.astype(jnp.float32) / temperature, num_seen)
    log_teacher = _masked_log_softmax(teacher_logits.astype(jnp.float32) / temperature, num_seen)
    teacher = jnp.exp(log_teacher)
    valid = _class_mask(student_logits.shape[-1], num_seen)
    terms = teacher * (log_teacher - log_student)  # [B, C]
    if valid is not None:
        terms = jnp.where(valid, terms, 0.0)
    kl = jnp.sum(terms, axis=-1)  # [B]
    return weight * temperature**2 * _masked_mean(kl, mask)
