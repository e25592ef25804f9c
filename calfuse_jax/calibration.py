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

The head computes g itself, for every mode, from a traced `TaskContext` (task index, number of
tasks, old and seen class counts), so a run compiles once whatever the mode. `learned` and
`dynamic` keep their parameters in their own `calib/...` subtree, so that "train only the gate"
and "never fuse the gate" are path rules. A mode is one entry of `GATES`: adding one is a
function here (see README, "Extending").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "old_fraction")

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


class TaskContext(NamedTuple):
    """Where in the stream the head is applied: int32 scalars, traced like any input.

    Attributes:
      task: 0-based index of the task being trained or evaluated.
      num_tasks: tasks in the stream.
      num_old: classes seen before this task (0 on the first).
      num_seen: classes seen including this task.
    """

    task: jax.Array
    num_tasks: jax.Array
    num_old: jax.Array
    num_seen: jax.Array


def task_context(bounds: Sequence[int], task: int) -> TaskContext:
    """The context of `task` from the task bounds [T + 1] (`TaskSplit.bounds`), as int32."""
    values = (task, len(bounds) - 1, bounds[task], bounds[task + 1])
    return TaskContext(*(np.int32(v) for v in values))


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


def _none_gate(head, f0, fa, ctx):
    return 0.0


def _fixed_gate(head, f0, fa, ctx):
    return head.value


def _schedule_gate(head, f0, fa, ctx):
    """`linear`: g_first -> g_last over the tasks (g_first for a single task); `old_fraction`:
    the share of old classes among the seen ones (0 on the first task)."""
    if head.schedule == "linear":
        return head.g_first + (head.g_last - head.g_first) * ctx.task / jnp.maximum(
            ctx.num_tasks - 1, 1
        )
    if head.schedule == "old_fraction":
        return ctx.num_old / ctx.num_seen
    raise ValueError(f"unknown gate schedule {head.schedule!r}; choose one of {SCHEDULES}")


def _learned_gate(head, f0, fa, ctx):
    return LearnedGate(head.init_bias, name="calib")(f0.shape[0])


def _dynamic_gate(head, f0, fa, ctx):
    n0, na = normalize(f0), normalize(fa)
    inputs = jnp.concatenate([n0, na, n0 * na], axis=-1)  # [B, 3D]
    dense = nn.Dense(
        1,
        kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.constant(head.init_bias),
        name="calib",
    )
    return jax.nn.sigmoid(dense(inputs))[:, 0]  # [B]


# Gate mode -> `fn(head, f0 [B, D], fa [B, D], ctx) -> g` (a scalar or [B]), called inside the
# head's `__call__`: a mode with parameters creates them there (under the name `calib`).
GATES: dict[str, Callable] = {
    "none": _none_gate,
    "fixed": _fixed_gate,
    "schedule": _schedule_gate,
    "learned": _learned_gate,
    "dynamic": _dynamic_gate,
}
GATE_MODES = tuple(GATES)
INITS = {"pytorch": pytorch_linear_init, "identity": identity_init}
HEAD_INITS = tuple(INITS)


def _pick(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return table[name]


class CalibratedHead(nn.Module):
    """Linear adapter (no bias) plus calibration gate.

    Parameters: `adapter/kernel` [D, D] (Flax orientation, `kernel = W^T`, so `fa = f0 @ kernel`),
    plus `calib/a` [] for `learned` or `calib/kernel` [3D, 1], `calib/bias` [1] for `dynamic`.
    The dynamic gate's kernel starts at zero, so every sample starts at `sigmoid(init_bias)`.

    Attributes:
      dim: feature width D.
      mode: gate mode, a key of `GATES` (see module docstring).
      adapter_init: adapter init, `pytorch` (uniform +-1/sqrt(D)) or `identity`. (Not called
        `init`: a Linen field of that name would hide `Module.init`, so `head.init(key, x)` breaks.)
      init_bias: initial gate pre-activation for `learned`/`dynamic` (0 -> g = 0.5).
      value: g of `fixed`; schedule, g_first, g_last: the `schedule` mode's settings.
    """

    dim: int
    mode: str = "dynamic"
    adapter_init: str = "pytorch"
    init_bias: float = 0.0
    value: float = 0.5
    schedule: str = "linear"
    g_first: float = 0.0
    g_last: float = 0.5

    @nn.compact
    def __call__(self, f0: jax.Array, ctx: TaskContext):
        """Calibrated features and the gate used.

        Args:
          f0: [B, D] frozen image features.
          ctx: the task context (`task_context`); traced, so every task shares one compile.

        Returns:
          ([B, D] unit-norm calibrated features, [B] gate values).
        """
        if f0.ndim != 2 or f0.shape[-1] != self.dim:
            raise ValueError(f"f0 must be [B, {self.dim}], got shape {f0.shape}")
        gate_fn = _pick(GATES, self.mode, "gate mode")
        kernel_init = _pick(INITS, self.adapter_init, "adapter init")
        fa = nn.Dense(self.dim, use_bias=False, kernel_init=kernel_init, name="adapter")(f0)
        gate = jnp.asarray(gate_fn(self, f0, fa, ctx), f0.dtype)
        gate = jnp.broadcast_to(gate, (f0.shape[0],))  # [B]
        return calibrate(f0, fa, gate), gate


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
