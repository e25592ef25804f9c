"""QR / SVD parameter fusion of the old and new heads (DESIGN.md §2).

For an output-space matrix `W` [out, in] (`y = W x`, PyTorch orientation):

    Q, R_old = qr(W_old)               # complete: Q [out, out], R_old [out, in]
    P        = Q^T W_new               # new weights in the old basis
    D        = |P - R_old|
    M        = min(1, D / max(D) + b)  # b = fusion bias ("mix_bias")
    W        = Q (M * P + (1 - M) * R_old)

`svd_fuse` (RAPF) uses `W_old = U (S Vh)` in place of `Q R_old`. Coefficients the new task moved a
lot keep their new value; the rest keep the old one.

Edge cases, all finite (no NaN):
- `b >= 1`: M = 1 everywhere, the result is `W_new` exactly (returned as is).
- `W_new == W_old` (element-wise), or `max(D) == 0`: the result is `W_old` exactly.
- Tall `W` (out > in): the *complete* factorisation (square Q, `R_old` padded with zero rows), so
  the part of `W_new` outside `W_old`'s column space is weighed by the mask instead of being
  dropped. For square and wide `W` the reduced and complete factorisations coincide. For the SVD,
  the complement of `U`'s columns is taken from the complete Householder QR of `U` (a fixed,
  reproducible choice; LAPACK's complete SVD leaves it unspecified).
- Rank-deficient `W_old`: Householder QR still gives an orthogonal Q; the directions outside
  `W_old`'s column space are whichever Householder picks (R has zero rows/diagonal there), and the
  formula is applied as written. An all-zero `W_old` gives Q = I, R_old = 0, so the result is
  `M * W_new` with `M = min(1, |W_new| / max|W_new| + b)`.
- Both results are invariant to the sign convention of the factorisation (flipping a column of Q
  and the matching row of R flips the same rows of P and R_old, so D, M and W are unchanged).

`fuse_params` applies these to whole parameter pytrees through ordered `"path_regex=action"`
rules (`config.fusion.rules`, big_vision's regex-rule style), jitted once per (tree structure,
plan): the bias is a traced argument, so one trace serves every task of a run.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

ACTIONS = ("qr", "svd", "keep_new", "keep_old", "average")

# Leaves with this last path key are Flax Dense kernels, stored as W^T ([in, out]).
FLAX_KERNEL_NAMES = ("kernel",)


def fuse_in_basis(
    basis: jax.Array, r_old: jax.Array, w_old: jax.Array, w_new: jax.Array, bias
) -> jax.Array:
    """The fusion formula for any orthogonal factorisation `w_old = basis @ r_old`.

    `basis (M * P + (1 - M) * r_old)` with `P = basis^T w_new`, `D = |P - r_old|`,
    `M = min(1, D / max(D) + bias)`; returns `w_old` when nothing changed and `w_new` for
    `bias >= 1` (see module docstring). `qr_fuse` and `svd_fuse` call it with their factors.

    Args:
      basis: [out, out] orthogonal matrix.
      r_old: [out, in] coefficients of `w_old` in that basis.
      w_old, w_new: [out, in] float32.
      bias: scalar fusion bias.

    Returns:
      [out, in] fused weights.
    """
    p = basis.T @ w_new  # [out, in]
    diff = jnp.abs(p - r_old)
    max_diff = jnp.max(diff)
    # A zero max(D) means nothing changed; the safe denominator only avoids 0/0 there.
    scaled = diff / jnp.where(max_diff > 0, max_diff, 1.0)
    mask = jnp.minimum(1.0, scaled + bias)
    fused = basis @ (mask * p + (1.0 - mask) * r_old)
    unchanged = (max_diff == 0) | jnp.all(w_new == w_old)
    fused = jnp.where(unchanged, w_old, fused)
    return jnp.where(bias >= 1.0, w_new, fused)


def _check_pair(w_old: jax.Array, w_new: jax.Array, name: str) -> None:
    if w_old.ndim != 2 or w_old.shape != w_new.shape:
        raise ValueError(
            f"{name} needs two 2-D matrices of the same shape, got {w_old.shape} and {w_new.shape}"
        )


def qr_fuse(w_old: jax.Array, w_new: jax.Array, bias: jax.Array | float) -> jax.Array:
    """QR fusion of two output-space matrices (see module docstring).

    Args:
      w_old: [out, in] previous task's weights (`y = W x`).
      w_new: [out, in] weights after training the current task.
      bias: fusion bias b (scalar, may be traced); b >= 1 returns `w_new`.

    Returns:
      [out, in] fused weights, dtype of `w_new`.
    """
    _check_pair(w_old, w_new, "qr_fuse")
    dtype = w_new.dtype
    w_old, w_new = w_old.astype(jnp.float32), w_new.astype(jnp.float32)
    q, r_old = jnp.linalg.qr(w_old, mode="complete")  # [out, out], [out, in]
    return fuse_in_basis(q, r_old, w_old, w_new, jnp.asarray(bias, jnp.float32)).astype(dtype)


def svd_fuse(w_old: jax.Array, w_new: jax.Array, bias: jax.Array | float) -> jax.Array:
    """SVD fusion (RAPF): `W_old = U (S Vh)` in place of `Q R_old` (see module docstring).

    Args:
      w_old: [out, in] previous task's weights.
      w_new: [out, in] current weights.
      bias: fusion bias b (scalar, may be traced).

    Returns:
      [out, in] fused weights, dtype of `w_new`.
    """
    _check_pair(w_old, w_new, "svd_fuse")
    dtype = w_new.dtype
    w_old, w_new = w_old.astype(jnp.float32), w_new.astype(jnp.float32)
    out_dim, in_dim = w_old.shape
    u, s, vh = jnp.linalg.svd(w_old, full_matrices=False)  # [out, k], [k], [k, in]
    r_old = s[:, None] * vh  # [k, in]
    if out_dim > in_dim:
        # Complete basis for a tall W: U's columns, then the Householder complement of span(U).
        q_full, _ = jnp.linalg.qr(u, mode="complete")  # [out, out]
        u = jnp.concatenate([u, q_full[:, in_dim:]], axis=1)  # [out, out]
        r_old = jnp.pad(r_old, ((0, out_dim - in_dim), (0, 0)))  # [out, in]
    return fuse_in_basis(u, r_old, w_old, w_new, jnp.asarray(bias, jnp.float32)).astype(dtype)


def path_name(path: Sequence[Any]) -> str:
    """`"adapter/kernel"` for a `jax.tree_util` key path."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


class Rule(NamedTuple):
    """A parsed fusion rule: leaves whose whole path matches `pattern` get `action`."""

    pattern: re.Pattern
    action: str


def parse_rules(rules: Sequence[str | Rule]) -> tuple[Rule, ...]:
    """Compiles `"path_regex=action"` strings (split at the last `=`), e.g. `"adapter/kernel=qr"`.

    Raises ValueError naming the rule that is not of that form, has an unknown action or a bad
    regex. Parse once per run and pass the result on: nothing is compiled again.
    """
    if isinstance(rules, str | bytes):
        raise ValueError(
            f"fusion rules must be a sequence of 'regex=action' strings, not {rules!r}"
        )
    parsed = []
    for rule in rules:
        if isinstance(rule, Rule):
            parsed.append(rule)
            continue
        pattern, eq, action = str(rule).rpartition("=")
        if not eq or action not in ACTIONS:
            raise ValueError(
                f"fusion rule {rule!r} must read 'path_regex=action' with an action of "
                f"{', '.join(ACTIONS)} (e.g. 'adapter/kernel=qr')"
            )
        try:
            parsed.append(Rule(re.compile(pattern), action))
        except re.error as err:
            raise ValueError(f"bad path regex {pattern!r} in fusion rule {rule!r}: {err}") from err
    return tuple(parsed)


def fusion_plan(params, rules: Sequence[str | Rule]) -> dict[str, tuple[str, str | None]]:
    """`{path: (action, pattern)}` for every leaf of `params`: what `fuse_params` does to it and
    the regex of the first rule that matched all of its path (`("keep_new", None)`: none did)."""
    rules = parse_rules(rules)
    plan = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(path)
        rule = next((r for r in rules if r.pattern.fullmatch(name)), None)
        plan[name] = (rule.action, rule.pattern.pattern) if rule else ("keep_new", None)
    return plan


def format_plan(plan: dict[str, tuple[str, str | None]]) -> str:
    """One line per leaf, `adapter/kernel: qr (due to 'adapter/kernel')`, for the run's log."""
    return "\n".join(
        f"  {name}: {action} " + (f"(due to {pattern!r})" if pattern else "(no rule matched)")
        for name, (action, pattern) in plan.items()
    )


def _fuse_leaf(name: str, action: str, old: jax.Array, new: jax.Array, bias) -> jax.Array:
    if action == "keep_new":
        return new
    if action == "keep_old":
        return old
    if action == "average":
        return ((old.astype(jnp.float32) + new.astype(jnp.float32)) / 2).astype(new.dtype)
    if old.ndim != 2:
        raise ValueError(
            f"fusion action {action!r} needs a 2-D leaf, but {name!r} has shape {old.shape}; "
            "add an earlier rule with keep_new/keep_old/average for it"
        )
    fuse = qr_fuse if action == "qr" else svd_fuse
    if name.rsplit("/", 1)[-1] in FLAX_KERNEL_NAMES:
        return fuse(old.T, new.T, bias).T  # Flax kernel = W^T: fuse in output space
    return fuse(old, new, bias)


def _fuse_tree(old, new, bias, actions):
    """Traced body of `fuse_params` (module-level so tests can count its traces)."""
    old_leaves, treedef = jax.tree_util.tree_flatten_with_path(old)
    new_leaves = treedef.flatten_up_to(new)
    fused = [
        _fuse_leaf(path_name(path), action, old_leaf, new_leaf, bias)
        for (path, old_leaf), new_leaf, action in zip(old_leaves, new_leaves, actions, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, fused)


@functools.lru_cache(maxsize=1)
def _jitted_fuse_tree():
    # Built lazily so a test can wrap `_fuse_tree` (chex.assert_max_traces) and clear the cache.
    return jax.jit(_fuse_tree, static_argnames=("actions",))


def fuse_params(old, new, rules: Sequence[str | Rule], bias: jax.Array | float):
    """Fuses two parameter pytrees leaf by leaf.

    Args:
      old: previous task's parameters (e.g. `{"adapter": {"kernel": ...}, "calib": {...}}`).
      new: current parameters, same structure and shapes.
      rules: ordered `"path_regex=action"` strings (or `parse_rules`' result); a leaf's path is
        its keys joined by "/" (`"adapter/kernel"`), matched with `re.fullmatch`; the first
        matching rule wins, and a leaf no rule matches keeps its new value (`keep_new`). Actions:
        `qr`, `svd` (2-D leaves only; a leaf whose last key is `kernel` is a Flax kernel `W^T`
        and is fused as `W`, any other 2-D leaf is taken as `W` itself), `keep_new`, `keep_old`,
        `average`.
      bias: fusion bias b, a traced scalar (changing it does not retrace).

    Returns:
      The fused pytree, same structure, shapes and dtypes as `new` (`new` itself when every
      leaf keeps its new value).
    """
    if jax.tree_util.tree_structure(old) != jax.tree_util.tree_structure(new):
        raise ValueError("old and new parameter trees differ in structure; fuse matching heads")
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(old)[0], jax.tree_util.tree_leaves(new), strict=True
    ):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"leaf {path_name(path)!r} has shape {jnp.shape(a)} in old, {jnp.shape(b)} in new"
            )
    actions = tuple(action for action, _ in fusion_plan(old, rules).values())
    if all(action == "keep_new" for action in actions):
        return new
    return _jitted_fuse_tree()(old, new, jnp.asarray(bias, jnp.float32), actions=actions)
