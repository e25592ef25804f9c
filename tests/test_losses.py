"""Losses against NumPy formulas written out term by term."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calfuse_jax import losses


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def logits_and_labels(seed=0, batch=6, classes=7, seen=4):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(batch, classes)) * 5).astype(np.float32)
    labels = rng.integers(0, seen, size=batch)
    return logits, labels


def test_cross_entropy_over_seen_classes_only():
    logits, labels = logits_and_labels()
    expected = -np_log_softmax(logits[:, :4].astype(np.float64))[np.arange(6), labels].mean()
    got = jax.jit(losses.cross_entropy)(logits, labels, 4)  # num_seen traced
    assert float(got) == pytest.approx(expected, rel=1e-5)
    everything = -np_log_softmax(logits.astype(np.float64))[np.arange(6), labels].mean()
    assert float(losses.cross_entropy(logits, labels)) == pytest.approx(everything, rel=1e-5)
    # Unseen columns get no gradient.
    grads = jax.grad(lambda z: losses.cross_entropy(z, labels, 4))(jnp.asarray(logits))
    np.testing.assert_array_equal(np.asarray(grads[:, 4:]), 0.0)


def test_cross_entropy_row_mask():
    logits, labels = logits_and_labels(1)
    mask = np.array([1, 0, 1, 1, 0, 0], np.float32)
    nll = -np_log_softmax(logits[:, :4].astype(np.float64))[np.arange(6), labels]
    got = losses.cross_entropy(logits, labels, num_seen=4, mask=mask)
    assert float(got) == pytest.approx(nll[mask > 0].mean(), rel=1e-5)
    assert float(losses.cross_entropy(logits, labels, 4, mask=np.zeros(6))) == 0.0


def test_hinge_loss():
    rng = np.random.default_rng(2)
    feats, own, other = (rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3))
    expected = np.maximum(0, (feats * other).sum(-1) - (feats * own).sum(-1) + 0.1).mean()
    got = jax.jit(losses.hinge_loss)(feats, own, other)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # A feature equal to its own text and orthogonal to the other: <f,T_j> - <f,T_i> = -1.
    e = np.eye(2, dtype=np.float32)
    assert float(losses.hinge_loss(e[:1], e[:1], e[1:], margin=0.5)) == 0.0
    assert float(losses.hinge_loss(e[:1], e[:1], e[1:], margin=1.5)) == pytest.approx(0.5)
    mask = np.array([1, 1, 0, 0, 0], np.float32)
    terms = np.maximum(0, (feats * other).sum(-1) - (feats * own).sum(-1) + 0.2)
    got = losses.hinge_loss(feats, own, other, margin=0.2, mask=mask)
    assert float(got) == pytest.approx(terms[:2].mean(), rel=1e-5)


@pytest.mark.parametrize("num_seen", [None, 4])
def test_distillation_matches_kl(num_seen):
    student, _ = logits_and_labels(3)
    teacher, _ = logits_and_labels(4)
    temperature = 2.0
    cols = slice(None) if num_seen is None else slice(0, num_seen)
    log_s = np_log_softmax(student[:, cols].astype(np.float64) / temperature)
    log_t = np_log_softmax(teacher[:, cols].astype(np.float64) / temperature)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1).mean()
    got = losses.distillation_loss(student, teacher, temperature, num_seen=num_seen, weight=0.5)
    assert float(got) == pytest.approx(0.5 * temperature**2 * kl, rel=1e-5)
    assert float(losses.distillation_loss(teacher, teacher, num_seen=num_seen)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_distillation_gradients_finite_and_only_to_student():
    student, _ = logits_and_labels(5)
    teacher, _ = logits_and_labels(6)

    def loss(s, t):
        return losses.distillation_loss(s, t, num_seen=3)

    grad_s, grad_t = jax.grad(loss, argnums=(0, 1))(jnp.asarray(student), jnp.asarray(teacher))
    assert np.isfinite(np.asarray(grad_s)).all()
    np.testing.assert_array_equal(np.asarray(grad_s[:, 3:]), 0.0)
    np.testing.assert_array_equal(np.asarray(grad_t), 0.0)  # the teacher is frozen
