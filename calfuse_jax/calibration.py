"""Feature calibration: a gate that mixes CLIP's own image feature with the adapted one.

DESIGN.md §2. With `n(v) = v / ||v||`, the calibrated feature is

    f = n( g * n(f0) + (1 - g) * n(fa) ),      fa = W f0,

and the logits are `s * f @ T^T`. The gate `g` in [0, 1] comes from one of five modes:

- `none`:     g = 0 (RAPF: only the adapted feature).
- `fixed`:    g = a constant (`value`).
- `schedule`: g depends on the task index (`linear` from g_first to g_last) or equals the fraction
              of old classes among the seen classes (`old_fraction`).
- `learned`:  g = sigmoid(a), one trainable scalar `calib/a`.
- `dynamic`:  g(x) = sigmoid(w . [n(f0), n(fa), n(f0) * n(fa)] + b), per sample, parameters
              `calib/kernel` [3D, 1] and `calib/bias` [1].

The first three are host-side numbers (`gate_value`) that the caller passes to the head; the last
two are parameters of `CalibratedHead`, kept in their own `calib/...` subtree so that "train only
the gate" and "never fuse the gate" are path rules.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

GATE_MODES = ("none", "fixed", "schedule", "learned", "dynamic")
SCHEDULES = ("linear", "old_fraction")
HEAD_INITS = ("pytorch", "identity")

# Features of exactly zero norm stay zero instead of becoming NaN.
_NORM_EPS = 1e-12


def normalize(v: jax.Array, axis: int = -1) -> jax.Array:
    """`v / ||v||` along `axis`; a zero vector stays zero (no NaN, finite gradient)."""
    squared = jnp.sum(jnp.square(v), axis=axis, keepdims=True)
    return v * jax.lax.rsqrt(jnp.maximum(squared, _NORM_EPS**2))


def calibrate(f0: jax.Array, fa: jax.Array, gate: jax.Array | float) -> jax.Array:
    """The calibrated feature `n(g * n(f0) + (1 - g) * n(fa))`.

    Args:
      f0: [B, D] frozen CLIP image features (any norm).
      fa: [B, D] adapted features `W f0` (any norm).
      gate: a scalar or [B] gate values in [0, 1]; g = 0 gives `n(fa)`, g = 1 gives `n(f0)`.

    Returns:
      [B, D] unit-norm calibrated features.
    """
    gate = jnp.asarray(gate, dtype=f0.dtype)
    if gate.ndim == 1:
        gate = gate[:, None]  # [B, 1]: one gate per sample
    elif gate.ndim != 0:
        raise ValueError(f"gate must be a scalar or [B], got shape {gate.shape}")
    mixed = gate * normalize(f0) + (1.0 - gate) * normalize(fa)
    return normalize(mixed)


def gate_value(
    mode: str,
    *,
    task: int,
    num_tasks: int,
    old_classes: int,
    seen_classes: int,
    value: float = 0.5,
    schedule: str = "linear",
    g_first: float = 0.0,
    g_last: float = 0.5,
) -> float | None:
    """The host-side gate of task `task` for the non-trainable modes.

    - `none` -> 0.0; `fixed` -> `value`;
    - `schedule` with `linear`: `g_first + (g_last - g_first) * task / (num_tasks - 1)` (g_first
      when there is a single task); with `old_fraction`: `old_classes / seen_classes` (0 on the
      first task, where no class is old);
    - `learned` / `dynamic` -> None: the head computes the gate from its parameters.

    Args:
      task: 0-based index of the task being trained or evaluated.
      num_tasks: number of tasks in the stream.
      old_classes: classes seen before this task.
      seen_classes: classes seen including this task.
    """
    if mode not in GATE_MODES:
        raise ValueError(f"unknown gate mode {mode!r}; choose one of {', '.join(GATE_MODES)}")
    if mode == "none":
        return 0.0
    if mode == "fixed":
        return float(value)
    if mode in ("learned", "dynamic"):
        return None
    if schedule == "linear":
        if num_tasks <= 1:
            return float(g_first)
        return float(g_first + (g_last - g_first) * task / (num_tasks - 1))
    if schedule == "old_fraction":
        if seen_classes <= 0:
            raise ValueError(f"seen_classes must be positive, got {seen_classes}")
        return float(old_classes) / float(seen_classes)
    raise ValueError(f"unknown gate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def pytorch_linear_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """PyTorch's default `nn.Linear` weight init: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / jnp.sqrt(shape[0])  # Flax kernel is [in, out], so fan_in is shape[0]
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def identity_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Identity kernel: the adapter starts as `fa = f0`."""
    del key
    if shape[0] != shape[1]:
        raise ValueError(f"identity init needs a square kernel, got {shape}")
    return jnp.eye(shape[0], dtype=dtype)


class LearnedGate(nn.Module):
    """One trainable scalar `a`; the gate is `sigmoid(a)` for every sample."""

    init_bias: float = 0.0

    @nn.compact
    def __call__(self, batch: int) -> jax.Array:
        a = self.param("a", nn.initializers.constant(self.init_bias), ())
        return jnp.broadcast_to(jax.nn.sigmoid(a), (batch,))  # [B]


class CalibratedHead(nn.Module):
    """Linear adapter (no bias) plus calibration gate.

    Parameters: `adapter/kernel` [D, D] (Flax orientation, `kernel = W^T`, so `fa = f0 @ kernel`),
    plus `calib/a` [] for `learned` or `calib/kernel` [3D, 1], `calib/bias` [1] for `dynamic`.
    The dynamic gate's kernel starts at zero, so every sample starts at `sigmoid(init_bias)`.

    Attributes:
      dim: feature width D.
      mode: gate mode, see module docstring.
      adapter_init: adapter init, `pytorch` (uniform +-1/sqrt(D)) or `identity`. (Not called
        `init`: a Linen field of that name would hide `Module.init`, so `head.init(key, x)` breaks.)
      init_bias: initial gate pre-activation for `learned`/`dynamic` (0 -> g = 0.5).
    """

    dim: int
    mode: str = "dynamic"
    adapter_init: str = "pytorch"
    init_bias: float = 0.0

    @nn.compact
    def __call__(self, f0: jax.Array, gate: jax.Array | float | None = None):
        """Calibrated features and the gate used.

        Args:
          f0: [B, D] frozen image features.
          gate: for `none`/`fixed`/`schedule`, the gate value (scalar or [B]) from `gate_value`;
            `none` (and `init`) default to 0. Must be None for `learned`/`dynamic`.

        Returns:
          ([B, D] unit-norm calibrated features, [B] gate values).
        """
        if self.mode not in GATE_MODES:
            raise ValueError(
                f"unknown gate mode {self.mode!r}; choose one of {', '.join(GATE_MODES)}"
            )
        if self.adapter_init not in HEAD_INITS:
            raise ValueError(
                f"unknown adapter init {self.adapter_init!r}; choose one of {HEAD_INITS}"
            )
        if f0.ndim != 2 or f0.shape[-1] != self.dim:
            raise ValueError(f"f0 must be [B, {self.dim}], got shape {f0.shape}")
        kernel_init = pytorch_linear_init if self.adapter_init == "pytorch" else identity_init
        adapter = nn.Dense(self.dim, use_bias=False, kernel_init=kernel_init, name="adapter")
        fa = adapter(f0)  # [B, D]
        batch = f0.shape[0]
        if self.mode in ("learned", "dynamic"):
            if gate is not None:
                raise ValueError(f"mode {self.mode!r} computes its own gate; pass gate=None")
            if self.mode == "learned":
                gate = LearnedGate(self.init_bias, name="calib")(batch)
            else:
                gate = self._dynamic_gate(f0, fa)
        else:
            if gate is None:
                # `head.init(key, f0)` needs no gate: these modes have no gate parameters.
                if self.mode != "none" and not self.is_initializing():
                    raise ValueError(
                        f"mode {self.mode!r} needs the gate from the caller (see gate_value)"
                    )
                gate = 0.0
            gate = jnp.broadcast_to(jnp.asarray(gate, f0.dtype), (batch,))
        return calibrate(f0, fa, gate), gate

    def _dynamic_gate(self, f0: jax.Array, fa: jax.Array) -> jax.Array:
        n0, na = normalize(f0), normalize(fa)
        inputs = jnp.concatenate([n0, na, n0 * na], axis=-1)  # [B, 3D]
        dense = nn.Dense(
            1,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.constant(self.init_bias),
            name="calib",
        )
        return jax.nn.sigmoid(dense(inputs))[:, 0]  # [B]


def head_logits(features: jax.Array, text_features: jax.Array, scale: jax.Array | float):
    """Cosine logits `scale * f @ T^T`.

    Args:
      features: [B, D] unit-norm calibrated features.
      text_features: [C, D] unit-norm class text embeddings (positions 0..C-1).
      scale: CLIP's logit scale `exp(logit_scale)`, 100 for OpenAI CLIP.

    Returns:
      [B, C] logits.
    """
    return scale * features @ text_features.T
