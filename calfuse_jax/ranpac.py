"""RanPAC (McDonnell et al., NeurIPS 2023): a fixed random projection, a ReLU and a ridge head.

    h = relu(f W)              W [D, M] ~ N(0, 1), fixed; M = `config.ranpac.dim`
    G += H^T H, Q += H^T Y     over every task's training rows (Y one-hot over all C classes)
    W_o = (G + lambda I)^-1 Q  logits = h W_o

so the head after task t is the ridge solution on all data seen so far. lambda = 10^k
(`config.ranpac.ridge_exponents`) is chosen per task on a held-out `holdout` of its rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def project(f0: jax.Array, projection: jax.Array) -> jax.Array:
    """[B, M] relu(f0 W) of f0 [B, D] and W [D, M]."""
    return jax.nn.relu(f0 @ projection)


def holdout_mask(rng: jax.Array, valid: jax.Array, fraction: float) -> jax.Array:
    """bool [N]: a random `fraction` of the valid rows [N]; floor((1 - fraction) n) stay in."""
    order = jnp.argsort(jnp.where(valid, jax.random.uniform(rng, valid.shape), 2.0))
    rank = jnp.argsort(order)  # 0 .. n - 1 on the valid rows, in random order
    kept = jnp.floor((1.0 - fraction) * jnp.sum(valid))
    return valid & (rank >= kept)


def ridge_errors(h_fit, y_fit, h_held, y_held, ridges: jax.Array) -> jax.Array:
    """[R] held-out squared errors of the ridge fits on (h_fit [n, M], y_fit [n, C]) for ridges
    [R], from one eigendecomposition of the smaller Gram matrix; zero rows take no part."""
    if h_fit.shape[0] <= h_fit.shape[1]:
        s, v = jnp.linalg.eigh(h_fit @ h_fit.T)
        left, right = (h_held @ h_fit.T) @ v, v.T @ y_fit
    else:
        s, v = jnp.linalg.eigh(h_fit.T @ h_fit)
        left, right = h_held @ v, v.T @ (h_fit.T @ y_fit)

    def error(ridge):
        return jnp.sum(jnp.square(left @ (right / (s + ridge)[:, None]) - y_held))

    return jax.vmap(error)(ridges)


def solve(gram: jax.Array, targets: jax.Array, ridge: jax.Array) -> jax.Array:
    """[M, C] `(G + ridge I)^-1 Q` by Cholesky."""
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram + ridge * eye), targets)


@functools.partial(jax.jit, static_argnames="holdout")
def accumulate(params: dict, features, labels, rng, ridges, holdout: float) -> dict:
    """`params` after one task's features [N, D] and labels int [N] (-1: padding)."""
    h = project(features, params["projection"]) * (labels >= 0)[:, None]  # [N, M]
    y = jax.nn.one_hot(labels, params["targets"].shape[1], dtype=h.dtype)  # [N, C], 0 for -1
    held = holdout_mask(rng, labels >= 0, holdout)[:, None]
    errors = ridge_errors(h * ~held, y * ~held, h * held, y * held, ridges)
    ridge = ridges[jnp.argmin(errors)]
    gram, targets = params["gram"] + h.T @ h, params["targets"] + h.T @ y
    weights = solve(gram, targets, ridge)
    return {**params, "gram": gram, "targets": targets, "ridge": ridge, "weights": weights}


@dataclasses.dataclass(frozen=True)
class RanPAC:
    dim: int
    num_classes: int
    projection_dim: int = 10_000
    ridge_exponents: tuple[int, int] = (-8, 13)
    holdout: float = 0.2
    trains = False
    fusion_rules = ()

    @classmethod
    def build(cls, config, dim, logit_scale, num_classes):
        r = config.ranpac
        exponents = tuple(int(k) for k in r.ridge_exponents)
        return cls(dim, num_classes, int(r.dim), exponents, float(r.holdout))

    def init(self, key):
        m, c = self.projection_dim, self.num_classes
        return {
            "projection": jax.random.normal(key, (self.dim, m)),
            "gram": jnp.zeros((m, m)),
            "targets": jnp.zeros((m, c)),
            "ridge": jnp.zeros(()),
            "weights": jnp.zeros((m, c)),
        }

    def update(self, params, features, labels, rng, inputs):
        """Adds one task's rows, padded to a multiple of 1024 (one compile for similar sizes)."""
        rows = -(-len(labels) // 1024) * 1024
        x = np.zeros((rows, self.dim), np.float32)
        y = np.full((rows,), -1, np.int32)
        x[: len(labels)], y[: len(labels)] = features, labels
        low, high = self.ridge_exponents
        ridges = 10.0 ** jnp.arange(low, high + 1, dtype=jnp.float32)
        return accumulate(params, x, y, rng, ridges, self.holdout)

    def logits(self, params, f0, inputs):
        return project(f0, params["projection"]) @ params["weights"]
