"""Losses of one task (DESIGN.md §2): seen-class cross-entropy, hard-pair hinge, distillation.

Logits [B, C] cover every class position, `num_seen` (may be traced) masks the unseen ones; each
loss is the mean over rows weighted by an optional mask [B], 0 when no row is valid.
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
    """Softmax cross-entropy of logits [B, C], positions [B] over classes < `num_seen`."""
    log_probs = _masked_log_softmax(logits.astype(jnp.float32), num_seen)  # [B, C]
    nll = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return _masked_mean(nll, mask)


def hinge_loss(
    features: jax.Array, text_own: jax.Array, text_other: jax.Array, margin: float = 0.1, mask=None
) -> jax.Array:
    """Hard-pair hinge `mean relu(<f, T_j> - <f, T_i> + margin)` of calibrated features [B, D]
    of old class i, its text embeddings T_i [B, D] and the paired new class's T_j [B, D]."""
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
    """`weight * T^2 * mean_b KL(p_teacher || p_student)` with `p = softmax(z / T)` over classes
    < `num_seen` of logits [B, C]; no gradient flows through the teacher."""
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
