"""QR / SVD parameter fusion of the old and new heads (DESIGN.md §2).

For `W` [out, in]: `Q, R_old = qr(W_old)` (complete, so a tall `W` keeps the part of `W_new`
outside `W_old`'s span), `P = Q^T W_new`, `D = |P - R_old|`, `M = min(1, D / max(D) + b)`,
`W = Q (M P + (1 - M) R_old)`; `svd_fuse` (RAPF) uses `W_old = U (S Vh)`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

ACTIONS = ("qr", "svd", "keep_new", "keep_old", "average")


def fuse_in_basis(
    basis: jax.Array, r_old: jax.Array, w_old: jax.Array, w_new: jax.Array, bias
) -> jax.Array:
    """The fusion formula for any orthogonal factorisation `w_old = basis [out, out] @ r_old`
    ([out, in]); `w_old` when nothing changed, `w_new` for `bias >= 1`."""
    p = basis.T @ w_new  # [out, in]
    diff = jnp.abs(p - r_old)
    max_diff = jnp.max(diff)
    # A zero max(D) means nothing changed; the safe denominator only avoids 0/0 there.
    mask = jnp.minimum(1.0, diff / jnp.where(max_diff > 0, max_diff, 1.0) + bias)
    fused = basis @ (mask * p + (1.0 - mask) * r_old)
    fused = jnp.where((max_diff == 0) | jnp.all(w_new == w_old), w_old, fused)
    return jnp.where(bias >= 1.0, w_new, fused)


def _svd_basis(w_old: jax.Array) -> tuple[jax.Array, jax.Array]:
    out_dim, in_dim = w_old.shape
    u, s, vh = jnp.linalg.svd(w_old, full_matrices=False)  # [out, k], [k], [k, in]
    r_old = s[:, None] * vh  # [k, in]
    if out_dim > in_dim:
        # Complete basis for a tall W: U's columns, then the Householder complement of span(U).
        q_full, _ = jnp.linalg.qr(u, mode="complete")  # [out, out]
        u = jnp.concatenate([u, q_full[:, in_dim:]], axis=1)  # [out, out]
        r_old = jnp.pad(r_old, ((0, out_dim - in_dim), (0, 0)))  # [out, in]
    return u, r_old


def _fuse(name: str, factorise, w_old: jax.Array, w_new: jax.Array, bias) -> jax.Array:
    if w_old.ndim != 2 or w_old.shape != w_new.shape:
        raise ValueError(
            f"{name} needs two 2-D matrices of the same shape, got {w_old.shape} and {w_new.shape}"
        )
    dtype = w_new.dtype
    w_old, w_new = w_old.astype(jnp.float32), w_new.astype(jnp.float32)
    basis, r_old = factorise(w_old)
    return fuse_in_basis(basis, r_old, w_old, w_new, jnp.asarray(bias, jnp.float32)).astype(dtype)


def qr_fuse(w_old: jax.Array, w_new: jax.Array, bias: jax.Array | float) -> jax.Array:
    """QR fusion of [out, in] matrices (`y = W x`); `bias` may be traced. Dtype of `w_new`."""
    return _fuse("qr_fuse", functools.partial(jnp.linalg.qr, mode="complete"), w_old, w_new, bias)


def svd_fuse(w_old: jax.Array, w_new: jax.Array, bias: jax.Array | float) -> jax.Array:
    """SVD fusion (RAPF) of [out, in] matrices; `bias` may be traced. Dtype of `w_new`."""
    return _fuse("svd_fuse", _svd_basis, w_old, w_new, bias)


def path_name(path: Sequence[Any]) -> str:
    """`"adapter/kernel"` for a `jax.tree_util` key path."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


class Rule(NamedTuple):
    """A parsed fusion rule: leaves whose whole path matches `pattern` get `action`."""

    pattern: re.Pattern
    action: str


def parse_rules(rules: Sequence[str | Rule]) -> tuple[Rule, ...]:
    """Compiles `"path_regex=action"` strings (split at the last `=`), e.g. `"adapter/kernel=qr"`;
    ValueError names a malformed rule, an unknown action or a bad regex."""
    if isinstance(rules, str | bytes):
        raise ValueError(
            f"fusion rules must be a sequence of 'regex=action' strings, not {rules!r}"
        )
    return tuple(rule if isinstance(rule, Rule) else _parse_rule(rule) for rule in rules)


def _parse_rule(rule: str) -> Rule:
    pattern, eq, action = str(rule).rpartition("=")
    if not eq or action not in ACTIONS:
        raise ValueError(
            f"fusion rule {rule!r} must read 'path_regex=action' with an action of "
            f"{', '.join(ACTIONS)} (e.g. 'adapter/kernel=qr')"
        )
    try:
        return Rule(re.compile(pattern), action)
    except re.error as err:
        raise ValueError(f"bad path regex {pattern!r} in fusion rule {rule!r}: {err}") from err


def fusion_plan(params, rules: Sequence[str | Rule]) -> dict[str, tuple[str, str | None]]:
    """`{path: (action, pattern)}` per leaf: its first matching rule, or `("keep_new", None)`."""
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
    if name.rsplit("/", 1)[-1] == "kernel":
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
    """Fuses two parameter pytrees of one structure and shapes leaf by leaf by `rules`
    (`parse_rules`; `qr`/`svd` take a leaf named `kernel` as a Flax kernel `W^T`); `bias` is
    traced. Returns `new` itself when every leaf keeps its new value."""
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
