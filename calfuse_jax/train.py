"""One task's training of the head on frozen features: Optax Adam, one jitted step, data parallel.

Every batch is the task's real features plus pseudo-features of K old classes and samples of the
old class of every hard pair, drawn inside the step from the stored Gaussians (DESIGN.md §2). The
batch is split over the mesh's `data` axis and the head replicated, so XLA inserts the gradient
all-reduce; the global batch (`config.train.batch_size`, rounded up to a multiple of the device
count) does not depend on the device count, and the ragged last batch is padded with a zero
mask, not dropped. Data order and pseudo-class lists come from NumPy generators seeded by
(seed, task, epoch) and step randomness is `fold_in(task_key, step)`, so a run is a pure function
of (config, seed, data) and a resumed run replays exactly."""

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
    """A value of the run became NaN or Inf: the training loss at `task`, `step` (1-based), or
    another `quantity` (step None), with `hint` as the likely fix."""

    LOSS_HINT = "lower config.train.lr or check the features for NaN/Inf"

    def __init__(self, task, step, value, quantity="the training loss", hint=LOSS_HINT):
        self.task, self.step, self.value, self.quantity, self.hint = (
            task,
            step,
            value,
            quantity,
            hint,
        )
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


def learning_rate(config: ml_collections.ConfigDict, step: int, epoch_steps: int) -> float:
    """`lr * lr_decay ** (number of milestone epochs already reached)` at 0-based `step`."""
    epoch = step // epoch_steps
    passed = sum(epoch >= int(m) for m in config.train.milestones)
    return float(config.train.lr) * float(config.train.lr_decay) ** passed


def optimizer() -> optax.GradientTransformation:
    """Adam's moment scaling; the step multiplies by `-learning_rate(...)` (a traced scalar), so
    the schedule never enters the compiled step."""
    return optax.scale_by_adam()


TRACES: collections.Counter = collections.Counter()  # traces of the jitted functions, by name


def _train_step(state: TrainState, batch, pseudo_ids, step, lr, key, inputs, method):
    TRACES["train_step"] += 1
    rng = jax.random.fold_in(key, step)
    grad_fn = jax.value_and_grad(method.loss, has_aux=True)
    (loss, _), grads = grad_fn(state.params, batch, pseudo_ids, rng, inputs)
    moments, opt_state = optimizer().update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda m: -lr * m, moments)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), loss


@functools.lru_cache(maxsize=16)
def train_step_fn(method: Method, mesh: Mesh):
    """The jitted step `(state, batch, pseudo_ids, step, lr, key, inputs) -> (state, loss)`,
    `state` donated, outputs replicated; cached, so every task of a run shares one compile."""
    step = functools.partial(_train_step, method=method)
    return jax.jit(step, donate_argnums=(0,), out_shardings=sharding.replicated(mesh))


def _eval_counts(params, batch, inputs: TaskInputs, method: Method):
    TRACES["eval_counts"] += 1
    f0, positions, mask = batch
    classes = inputs.text.shape[0]
    logits = method.logits(params, f0, inputs)
    logits = jnp.where(jnp.arange(classes) < inputs.ctx.num_seen, logits, -jnp.inf)
    correct = (jnp.argmax(logits, axis=-1) == positions).astype(jnp.float32) * mask
    return (
        jax.ops.segment_sum(correct, positions, num_segments=classes),
        jax.ops.segment_sum(mask, positions, num_segments=classes),
    )


@functools.lru_cache(maxsize=16)
def eval_counts_fn(method: Method, mesh: Mesh):
    """Jitted `(params, batch, inputs) -> (correct [C], count [C])` per class."""
    counts = functools.partial(_eval_counts, method=method)
    return jax.jit(counts, out_shardings=sharding.replicated(mesh))


def evaluate(method: Method, params, features, labels, inputs: TaskInputs, mesh, batch_size: int):
    """(correct [C], count [C]) of the head on (features [M, D], positions [M]), in batches of
    `batch_size` rows (rounded up to the mesh size; the last padded with mask 0), so one compiled
    function serves every batch and task of a run."""
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


def epoch_permutation(seed: int, task: int, epoch: int, n: int) -> np.ndarray:
    """The order of the task's N training rows in epoch `epoch` (a pure function of its args)."""
    return np.random.default_rng([seed, task, epoch, 0]).permutation(n)


def pseudo_class_schedule(
    seed: int, task: int, epoch: int, old_ids: np.ndarray, steps: int, per_batch: int
) -> np.ndarray:
    """int32 [steps, K]: old classes of each batch, cycled from a list reshuffled every epoch."""
    if per_batch == 0 or len(old_ids) == 0:
        return np.zeros((steps, max(per_batch, 1)), np.int32)
    order = np.random.default_rng([seed, task, epoch, 1]).permutation(np.asarray(old_ids))
    slots = np.arange(steps * per_batch).reshape(steps, per_batch) % len(order)
    return order[slots].astype(np.int32)


def host_batch(features, labels, rows: np.ndarray, padded: int):
    """(features [Bp, D], labels int32 [Bp], mask float32 [Bp]); rows past len(rows) masked."""
    x = np.zeros((padded, features.shape[1]), np.float32)
    y = np.zeros((padded,), np.int32)
    mask = np.zeros((padded,), np.float32)
    x[: len(rows)], y[: len(rows)], mask[: len(rows)] = features[rows], labels[rows], 1.0
    return x, y, mask


class TaskView(NamedTuple):
    """One task as `train_task` sees it (built by `continual`)."""

    task: int
    features: np.ndarray  # [N, D] the task's training features
    labels: np.ndarray  # int32 [N] their positions
    old_ids: np.ndarray  # int [C_old] old class positions (the pseudo-feature classes)
    key: jax.Array  # the task's key, replicated
    inputs: TaskInputs  # replicated: what the method reads


def check_losses(pending: list[tuple[int, jax.Array]], task: int, done: list, report=None):
    """Fetches the losses of `pending` (step, loss) pairs into `done`, empties `pending`, and
    passes (steps, losses) to `report` when given; NonFiniteLossError on the first NaN/Inf."""
    if not pending:
        return
    values = sharding.to_host(jnp.stack([loss for _, loss in pending]))
    bad = np.flatnonzero(~np.isfinite(values))
    steps = [step for step, _ in pending]
    pending.clear()
    if bad.size:
        raise NonFiniteLossError(task, steps[bad[0]], float(values[bad[0]]))
    done.extend(float(v) for v in values)
    if report is not None:
        report(steps, values)


def train_task(
    method: Method,
    config: ml_collections.ConfigDict,
    view: TaskView,
    state: TrainState,
    mesh: Mesh,
    *,
    start_step: int = 0,
    save_step: Callable[[int, TrainState, list[float]], None] | None = None,
    epoch_losses: list[float] | None = None,
    step_callback: Callable[[int, int], None] | None = None,
    loss_callback: Callable[[int, list[int], np.ndarray, np.ndarray], None] | None = None,
    progress: bool = True,
) -> tuple[TrainState, dict]:
    """Trains `method` on one task from `start_step` (0, or a step checkpoint's step).

    Args:
      state: params and optimiser state matching `start_step`, replicated.
      save_step: `save_step(step, state, epoch_losses)` every `checkpoint_every_steps` steps and
        on KeyboardInterrupt or `interrupt.requested()` (the epoch's losses so far, so a resumed
        run reports the same epoch loss); `epoch_losses`: those when resuming mid-task.
      step_callback: `fn(task, completed_steps)` after every step; loss_callback: `fn(task,
        steps, losses, lrs)` as losses reach the host (each epoch and step checkpoint).

    Returns (final state, {`loss`: mean of the last epoch, `steps`}); raises NonFiniteLossError
    on a NaN/Inf loss (checked every epoch and before every step checkpoint).
    """
    epochs, every = int(config.train.epochs), int(config.train.checkpoint_every_steps)
    epoch_steps = steps_per_epoch(len(view.labels), int(config.train.batch_size))
    total = epochs * epoch_steps
    step_fn = train_step_fn(method, mesh)
    pending, last_loss, step = [], None, start_step  # pending: (step, loss) not yet checked
    # The saved losses of the epoch `start_step` is in (none at an epoch boundary: a step
    # checkpoint there holds the finished epoch's).
    within = start_step % epoch_steps
    losses = list(epoch_losses or [])[-within:] if within else []
    bar = tqdm(total=total, initial=start_step, desc=f"task {view.task}", disable=not progress)
    report = _loss_reporter(config, view.task, epoch_steps, loss_callback)
    try:
        for epoch in range(start_step // epoch_steps, epochs):
            for batch, pseudo_ids in _epoch_batches(config, view, epoch, step, epoch_steps, mesh):
                lr = learning_rate(config, step, epoch_steps)
                scalars = sharding.replicate((pseudo_ids, np.int32(step), np.float32(lr)), mesh)
                state, loss = step_fn(state, batch, *scalars, view.key, view.inputs)
                step += 1
                pending.append((step, loss))
                bar.update(1)
                if (signum := interrupt.requested()) and step < total:  # saved below
                    raise interrupt.Interrupted(signum)  # (after the last step, the task ends)
                if save_step is not None and every and step % every == 0 and step < total:
                    check_losses(pending, view.task, losses, report)
                    save_step(step, state, losses)
                if step_callback is not None:
                    step_callback(view.task, step)
            check_losses(pending, view.task, losses, report)
            last_loss, losses = float(np.mean(losses)), []
            bar.set_postfix(loss=f"{last_loss:.4f}")
    except KeyboardInterrupt as error:  # an Interrupted learns where it stopped, what is saved
        _save_stopped(error, (view.task, step, total), state, save_step, losses, pending, report)
        raise
    finally:
        bar.close()
    return state, {"loss": last_loss, "steps": total}


def _epoch_batches(config, view: TaskView, epoch: int, step: int, epoch_steps: int, mesh: Mesh):
    """Yields the sharded (batch, pseudo-class ids [K]) of `epoch` from global step `step` on."""
    batch_size, seed = int(config.train.batch_size), int(config.seed)
    padded = sharding.padded_size(batch_size, mesh)
    order = epoch_permutation(seed, view.task, epoch, len(view.labels))
    per_batch = int(config.pseudo.classes_per_batch)
    pseudo = pseudo_class_schedule(seed, view.task, epoch, view.old_ids, epoch_steps, per_batch)
    for index in range(step - epoch * epoch_steps, epoch_steps):
        rows = order[index * batch_size : (index + 1) * batch_size]
        yield (
            sharding.shard_batch(host_batch(view.features, view.labels, rows, padded), mesh),
            pseudo[index],
        )


def _loss_reporter(config, task: int, epoch_steps: int, loss_callback):
    """`report(steps, losses)` for `check_losses`: adds the steps' learning rates and the task."""
    if loss_callback is None:
        return None

    def report(steps: list[int], values: np.ndarray) -> None:
        lrs = np.array([learning_rate(config, s - 1, epoch_steps) for s in steps])
        loss_callback(task, steps, values, lrs)

    return report


def _save_stopped(error, stopped, state, save_step, losses, pending, report) -> None:
    """Ctrl-C or SIGTERM, between steps (`interrupt.deferred` keeps signals out of a step and
    its donated state): keeps the work so far as a step checkpoint; an `Interrupted` learns
    where the run stopped and what was saved."""
    task, step, total = stopped
    where = f"at task {task}, step {step} of {total}"
    if save_step is not None and 0 < step < total:
        check_losses(pending, task, losses, report)
        logger.warning("interrupted at task %d step %d; saving a step checkpoint", task, step)
        save_step(step, state, losses)
        where += " (step checkpoint saved)"
    if isinstance(error, interrupt.Interrupted):
        error.where = where
