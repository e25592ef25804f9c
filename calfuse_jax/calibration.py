"""Feature calibration: a gate mixes CLIP's own image feature with the adapted one (DESIGN.md §2).

`f = n(g n(f0) + (1 - g) n(W f0))` with `n(v) = v / ||v||`, logits `s f @ T^T`. The gate is a mode
of `GATES`, computed from a traced `TaskContext` (one compile per run); gate parameters live under
`calib/...`.
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
    """Unit-norm [B, D] `n(g n(f0) + (1 - g) n(fa))` of frozen f0 [B, D] and adapted fa [B, D],
    with a scalar or [B] gate in [0, 1]."""
    gate = jnp.asarray(gate, dtype=f0.dtype)
    if gate.ndim == 1:
        gate = gate[:, None]  # [B, 1]: one gate per sample
    elif gate.ndim != 0:
        raise ValueError(f"gate must be a scalar or [B], got shape {gate.shape}")
    return normalize(gate * normalize(f0) + (1.0 - gate) * normalize(fa))


class TaskContext(NamedTuple):
    """int32 scalars, traced: the task, the stream's tasks, classes seen before it and with it."""

    task: jax.Array
    num_tasks: jax.Array
    num_old: jax.Array
    num_seen: jax.Array


def task_context(bounds: Sequence[int], task: int) -> TaskContext:
    """The context of `task` from the task bounds [T + 1] (`TaskSplit.bounds`), as int32."""
    values = (task, len(bounds) - 1, bounds[task], bounds[task + 1])
    return TaskContext(*(np.int32(v) for v in values))


def pytorch_linear_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """PyTorch's `nn.Linear` weight init, uniform in +-1/sqrt(fan_in) (Flax kernel [in, out])."""
    bound = 1.0 / jnp.sqrt(shape[0])
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


def _schedule_gate(head, f0, fa, ctx):
    """`linear`: g_first -> g_last over the tasks; `old_fraction`: old classes / seen classes."""
    if head.schedule == "linear":
        moved = (head.g_last - head.g_first) * ctx.task
        return head.g_first + moved / jnp.maximum(ctx.num_tasks - 1, 1)
    if head.schedule == "old_fraction":
        return ctx.num_old / ctx.num_seen
    raise ValueError(f"unknown gate schedule {head.schedule!r}; choose one of {SCHEDULES}")


def _learned_gate(head, f0, fa, ctx):
    return LearnedGate(head.init_bias, name="calib")(f0.shape[0])


def _dynamic_gate(head, f0, fa, ctx):
    """Per sample `sigmoid(w . [n(f0), n(fa), n(f0) n(fa)] + b)`; w starts at zero."""
    n0, na = normalize(f0), normalize(fa)
    inputs = jnp.concatenate([n0, na, n0 * na], axis=-1)  # [B, 3D]
    bias_init = nn.initializers.constant(head.init_bias)
    dense = nn.Dense(1, kernel_init=nn.initializers.zeros, bias_init=bias_init, name="calib")
    return jax.nn.sigmoid(dense(inputs))[:, 0]  # [B]


# Gate mode -> `fn(head, f0 [B, D], fa [B, D], ctx) -> g` (a scalar or [B]), called inside the
# head's `__call__`: a mode with parameters creates them there (under the name `calib`).
GATES: dict[str, Callable] = {
    "none": lambda head, f0, fa, ctx: 0.0,
    "fixed": lambda head, f0, fa, ctx: head.value,
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
    """Linear adapter (no bias, `adapter/kernel` [D, D], `fa = f0 @ kernel`) plus the gate of
    `mode`. `adapter_init` is `pytorch` or `identity` (a field named `init` would hide
    `Module.init`); `init_bias` is the learned/dynamic gate's start (0: g = 0.5); `value` is g of
    `fixed`; `schedule`, `g_first`, `g_last` configure `schedule`."""

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
        """(unit-norm calibrated features [B, D], gate [B]) of frozen features f0 [B, D]."""
        if f0.ndim != 2 or f0.shape[-1] != self.dim:
            raise ValueError(f"f0 must be [B, {self.dim}], got shape {f0.shape}")
        gate_fn = _pick(GATES, self.mode, "gate mode")
        kernel_init = _pick(INITS, self.adapter_init, "adapter init")
        fa = nn.Dense(self.dim, use_bias=False, kernel_init=kernel_init, name="adapter")(f0)
        gate = jnp.broadcast_to(jnp.asarray(gate_fn(self, f0, fa, ctx), f0.dtype), f0.shape[:1])
        return calibrate(f0, fa, gate), gate


def head_logits(features: jax.Array, text_features: jax.Array, scale: jax.Array | float):
    """Cosine logits [B, C] `scale * f @ T^T` of unit features [B, D] and text [C, D]."""
    return scale * features @ text_features.T
