"""One task's training of the head on frozen features: Optax Adam, one device program per epoch.

Rows are padded to the run's largest task (one compile); row orders come from `fold_in(key,
epoch)`, step randomness from `fold_in(key, step)`, so a run resumed at an epoch replays exactly.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from calfuse_jax import interrupt, sharding
from calfuse_jax.methods import Method, TaskInputs

logger = logging.getLogger("calfuse_jax")


class NonFiniteLossError(FloatingPointError):
    """A value became NaN/Inf: the loss at `task`, `step` (1-based), or another `quantity`."""

    LOSS_HINT = "lower config.train.lr or check the features for NaN/Inf"

    def __init__(self, task, step, value, quantity="the training loss", hint=LOSS_HINT):
        self.task, self.step, self.value = task, step, value
        self.quantity, self.hint = quantity, hint
        where = f"task {task}" + ("" if step is None else f", step {step}")
        super().__init__(
            f"{quantity} became {value} at {where}; the run stopped and the last good "
            f"checkpoint is kept: {hint}"
        )


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]).all()


def check_finite(tree, task: int, quantity: str, hint: str) -> None:
    """Raises NonFiniteLossError naming `quantity` when a leaf of `tree` holds NaN/Inf."""
    if not sharding.to_host(_all_finite(tree)):
        raise NonFiniteLossError(task, None, "NaN/Inf", quantity, hint)


class TrainState(NamedTuple):
    """What the step updates (and donates): head params and Adam state."""

    params: Any
    opt_state: Any


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """ceil(N / B): the last, ragged batch is kept (padded and masked)."""
    return -(-num_examples // batch_size)


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate by epoch: `lr` times `lr_decay` at each milestone (listed twice: twice)."""
    return decays(config)(float(config.train.lr))


def decays(config: ml_collections.ConfigDict) -> Callable[[Any], optax.Schedule]:
    """`lr -> schedule` of `config`'s decays (cached: one object, so one compile, per setting)."""
    milestones = tuple(sorted(int(m) for m in config.train.milestones))
    return _decays(float(config.train.lr_decay), milestones)


@functools.lru_cache(maxsize=64)
def _decays(decay: float, milestones: tuple[int, ...]) -> Callable[[Any], optax.Schedule]:
    scales = {m: decay**n for m, n in collections.Counter(milestones).items()}
    return lambda lr: optax.piecewise_constant_schedule(lr, scales)


def optimizer() -> optax.GradientTransformation:
    """Adam's moment scaling; the step multiplies by `-lr(epoch)` itself."""
    return optax.scale_by_adam()


TRACES: collections.Counter = collections.Counter()  # traces of the jitted functions, by name


def _train_step(state: TrainState, batch, pseudo_ids, step, lr, key, inputs, method):
    rng = jax.random.fold_in(key, step)
    grad_fn = jax.value_and_grad(method.loss, has_aux=True)
    (loss, _), grads = grad_fn(state.params, batch, pseudo_ids, rng, inputs)
    moments, opt_state = optimizer().update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda m: -lr * m, moments)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), loss


def task_keys(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(step, order, pseudo) keys of a task, each folded with the step or epoch."""
    return tuple(jax.random.split(key, 3))


def _valid_first(key: jax.Array, count, capacity: int) -> jax.Array:
    """int32 [capacity]: a uniformly random order of 0..count-1, then count..capacity-1."""
    scores = jax.random.uniform(key, (capacity,))
    return jnp.argsort(jnp.where(jnp.arange(capacity) < count, scores, 2.0)).astype(jnp.int32)


def epoch_order(order_key: jax.Array, epoch, count, capacity: int) -> jax.Array:
    """The order of the task's `count` training rows (of `capacity` slots) in `epoch`."""
    return _valid_first(jax.random.fold_in(order_key, epoch), count, capacity)


def pseudo_class_schedule(pseudo_key, epoch, num_old, steps: int, per_batch: int, classes: int):
    """int32 [steps, max(K, 1)]: each batch's old classes, reshuffled every epoch; 0 if none."""
    order = _valid_first(jax.random.fold_in(pseudo_key, epoch), num_old, classes)
    slots = jnp.arange(steps * max(per_batch, 1)).reshape(steps, -1)
    return order[slots % jnp.maximum(num_old, 1)]


class TaskData(NamedTuple):
    """A task's training rows on the device, padded to the run's `capacity` (one compile for
    every task): features [capacity, D] and positions int32 [capacity] sharded over `data`
    (zero past `count`), `count` int32 replicated."""

    features: jax.Array
    labels: jax.Array
    count: jax.Array


def _epoch(state, data: TaskData, epoch, key, inputs, *, method, shape, schedule, mesh):
    """One epoch: (state, losses [max steps] (0 past the epoch), lrs [max steps])."""
    TRACES["train_step"] += 1
    batch_size, padded, per_batch = shape
    features, labels, count = data
    capacity, classes = features.shape[0], inputs.text.shape[0]
    max_steps = steps_per_epoch(capacity, batch_size)
    step_key, order_key, pseudo_key = task_keys(key)
    steps = (count + batch_size - 1) // batch_size
    order = epoch_order(order_key, epoch, count, capacity)
    pseudo = pseudo_class_schedule(
        pseudo_key, epoch, inputs.ctx.num_old, max_steps, per_batch, classes
    )
    lr = schedule(inputs.floats.lr)(epoch)

    def body(index, carry):
        state, losses = carry
        slot = index * batch_size + jnp.arange(padded)
        valid = (jnp.arange(padded) < batch_size) & (slot < count)
        rows = order[jnp.minimum(slot, capacity - 1)]
        batch = (
            jnp.where(valid[:, None], features[rows], 0.0),
            jnp.where(valid, labels[rows], 0),
            valid.astype(jnp.float32),
        )
        batch = jax.lax.with_sharding_constraint(batch, sharding.data_sharding(mesh))
        step = epoch * steps + index
        state, loss = _train_step(state, batch, pseudo[index], step, lr, step_key, inputs, method)
        return state, losses.at[index].set(loss)

    state, losses = jax.lax.fori_loop(0, steps, body, (state, jnp.zeros(max_steps, jnp.float32)))
    return state, losses, jnp.full(max_steps, lr)


# Runs trained together share data and statistics; their teacher and step floats differ.
SEED_AXES = TaskInputs(None, None, None, None, None, None, 0, None, 0)


@functools.lru_cache(maxsize=16)
def epoch_fn(method: Method, mesh: Mesh, shape: tuple, schedule: Callable, seeds=False):
    """The jitted epoch `(state, data, epoch, key, inputs) -> (state, losses, lrs)`, `state`
    donated; `shape`: (batch size, padded to the mesh, K pseudo-classes); `schedule`:
    `decays(config)`. `seeds`: vmapped over runs trained together (axes `SEED_AXES`)."""
    fn = functools.partial(_epoch, method=method, shape=shape, schedule=schedule, mesh=mesh)
    if seeds:
        fn = jax.vmap(fn, in_axes=(0, None, None, 0, SEED_AXES))
    return jax.jit(fn, donate_argnums=(0,), out_shardings=sharding.replicated(mesh))


def _eval_counts(params, batch, inputs: TaskInputs, method: Method):
    TRACES["eval_counts"] += 1
    f0, positions, mask = batch
    classes = inputs.text.shape[0]
    logits = method.logits(params, f0, inputs)
    logits = jnp.where(jnp.arange(classes) < inputs.ctx.num_seen, logits, -jnp.inf)
    correct = (jnp.argmax(logits, axis=-1) == positions).astype(jnp.float32) * mask
    per_class = functools.partial(jax.ops.segment_sum, segment_ids=positions, num_segments=classes)
    return per_class(correct), per_class(mask)


@functools.lru_cache(maxsize=16)
def eval_counts_fn(method: Method, mesh: Mesh):
    """Jitted `(params, batch, inputs) -> (correct [C], count [C])` per class."""
    counts = functools.partial(_eval_counts, method=method)
    return jax.jit(counts, out_shardings=sharding.replicated(mesh))


def evaluate(method: Method, params, features, labels, inputs: TaskInputs, mesh, batch_size: int):
    """(correct [C], count [C]) on features [M, D] and positions [M], in padded batches."""
    counts = eval_counts_fn(method, mesh)
    size = sharding.padded_size(batch_size, mesh)
    classes = inputs.text.shape[0]
    correct, total = np.zeros(classes), np.zeros(classes)
    for start in range(0, len(labels), size):
        rows = np.arange(start, min(start + size, len(labels)))
        batch = sharding.shard_batch(host_batch(features, labels, rows, size), mesh)
        c, n = sharding.to_host(counts(params, batch, inputs))
        correct, total = correct + c, total + n
    return correct, total


def host_batch(features, labels, rows: np.ndarray, padded: int):
    """(features [Bp, D], labels int32 [Bp], mask float32 [Bp]); rows past len(rows) masked."""
    x = np.zeros((padded, features.shape[1]), np.float32)
    y = np.zeros((padded,), np.int32)
    x[: len(rows)], y[: len(rows)] = features[rows], labels[rows]
    return x, y, (np.arange(padded) < len(rows)).astype(np.float32)


class TaskView(NamedTuple):
    """One task as `train_task` sees it (built by `continual`)."""

    task: int
    num_tasks: int
    features: np.ndarray  # [N, D] the task's training features
    labels: np.ndarray  # int32 [N] their positions
    capacity: int  # rows of the run's largest task, padded to the mesh (one shape per run)
    key: jax.Array  # the task's key, replicated ([S, ...] for `members`)
    inputs: TaskInputs  # replicated: what the method reads (`SEED_AXES` stacked for `members`)
    members: tuple[str, ...] = ()  # labels of S runs trained together (vmapped), or () for one


def task_data(view: TaskView, mesh: Mesh) -> TaskData:
    """The view's training rows on the device, zero-padded to `view.capacity` rows."""
    count = len(view.labels)
    features = np.zeros((view.capacity, view.features.shape[1]), np.float32)
    labels = np.zeros((view.capacity,), np.int32)
    features[:count], labels[:count] = view.features, view.labels
    rows = sharding.shard_batch((features, labels), mesh)
    return TaskData(*rows, sharding.replicate(np.int32(count), mesh))


def train_task(
    method: Method,
    config: ml_collections.ConfigDict,
    view: TaskView,
    state: TrainState,
    mesh: Mesh,
    *,
    start_step: int = 0,
    save_step: Callable[[int, TrainState], None] | None = None,
    step_callback: Callable[[int, int], None] | None = None,
    loss_callback: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
    progress: bool = True,
) -> tuple[TrainState, dict]:
    """Trains `method` on one task from `start_step` (an epoch boundary); returns (state,
    {`loss`: the last epoch's mean (a list per run), `steps`}).

    `state` (params and optimiser state, replicated) has a leading axis of S runs with
    `view.members`. After each epoch the host checks the losses (NonFiniteLossError names the
    step), calls `loss_callback(task, steps, losses, lrs)` (the epoch's 1-based steps) and
    `step_callback(task, completed_steps)`, and calls `save_step(step, state)` at the end of an
    epoch that passes a multiple of `checkpoint_every_steps` (not after the last one) and on
    Ctrl-C/SIGTERM or a callback's KeyboardInterrupt."""
    batch_size, epochs = int(config.train.batch_size), int(config.train.epochs)
    epoch_steps = steps_per_epoch(len(view.labels), batch_size)
    total, every = epochs * epoch_steps, int(config.train.checkpoint_every_steps)
    if start_step % epoch_steps:
        raise ValueError(f"start_step {start_step} is not an epoch boundary ({epoch_steps} steps)")
    per_batch = max(int(config.pseudo.classes_per_batch), 1)
    shape = (batch_size, sharding.padded_size(batch_size, mesh), per_batch)
    run_epoch = epoch_fn(method, mesh, shape, decays(config), seeds=bool(view.members))
    name = f"task {view.task} ({view.task + 1}/{view.num_tasks})"
    name += f", {len(view.members)} runs together" if view.members else ""
    data = task_data(view, mesh)
    bar = tqdm(total=total, initial=start_step, desc=name, disable=not progress, smoothing=0)
    step, loss = start_step, None
    try:
        for epoch in range(start_step // epoch_steps, epochs):
            here = sharding.replicate(np.int32(epoch), mesh)
            state, losses, lrs = run_epoch(state, data, here, view.key, view.inputs)
            steps = step + np.arange(1, epoch_steps + 1)
            losses, lrs = (x[..., :epoch_steps] for x in sharding.to_host((losses, lrs)))  # [S,] n
            _check_losses(view, steps, losses)
            done, step, loss = step, int(steps[-1]), np.mean(losses, axis=-1)
            if loss_callback is not None:
                loss_callback(view.task, steps, losses, lrs)
            _advance(bar, epoch_steps, float(np.mean(loss)), first=done == start_step)
            if step < total and (signum := interrupt.requested()):
                raise interrupt.Interrupted(signum)  # saved below
            if step < total and save_step is not None and every and step // every > done // every:
                save_step(step, state)
            if step_callback is not None:
                step_callback(view.task, step)
    except KeyboardInterrupt as error:  # an Interrupted learns where it stopped, what is saved
        _save_stopped(error, (view.task, step, total), state, save_step)
        raise
    finally:
        bar.close()
    loss = None if loss is None else (loss.tolist() if view.members else float(loss))
    return state, {"loss": loss, "steps": total}


def _check_losses(view: TaskView, steps: np.ndarray, losses: np.ndarray) -> None:
    """NonFiniteLossError at the first step (and run) whose loss is NaN/Inf."""
    losses = np.atleast_2d(losses)  # [S, n]
    bad = np.argwhere(~np.isfinite(losses).T)  # (step, run), ordered by step
    if len(bad):
        index, row = bad[0]
        quantity = "the training loss" + (f" of {view.members[row]}" if view.members else "")
        raise NonFiniteLossError(view.task, int(steps[index]), float(losses[row, index]), quantity)


def _advance(bar, steps: int, loss: float, first: bool) -> None:
    bar.update(steps)
    bar.set_postfix(loss=f"{loss:.4f}")
    if first and not bar.disable:  # the ETA leaves the first epoch (the compile) out
        bar.start_t, bar.initial = bar._time(), bar.n


def _save_stopped(error, stopped, state, save_step) -> None:
    """Saves a step checkpoint on Ctrl-C/SIGTERM; tells an `Interrupted` where it stopped."""
    task, step, total = stopped
    where = f"at task {task}, step {step} of {total}"
    if save_step is not None and 0 < step < total:
        logger.warning("interrupted at task %d step %d; saving a step checkpoint", task, step)
        save_step(step, state)
        where += " (step checkpoint saved)"
    if isinstance(error, interrupt.Interrupted):
        error.where = where
