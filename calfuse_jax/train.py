"""One task's training of the head on frozen features: Optax Adam, one jitted step, data parallel.

Every batch is the task's real features plus pseudo-features of K old classes (drawn inside the
step from the stored Gaussians) plus samples of the old class of every hard pair (DESIGN.md §2).
The batch is split over the `data` axis of the mesh and the head is replicated, so XLA inserts the
gradient all-reduce; the global batch (`config.train.batch_size`, rounded up to a multiple of the
device count) does not depend on the number of devices, and the ragged last batch is padded to it
with a zero mask rather than dropped. Task inputs are padded to the stream's C classes, so the
step is traced and compiled once per run, not once per task. Data order and pseudo-class lists
come from NumPy generators seeded by (seed, task, epoch); step randomness is
`fold_in(task_key, step)`; so a run is a pure function of (config, seed, data), and a resumed run
replays exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from calfuse_jax import calibration, losses, sharding, stats
from calfuse_jax.config import check_switches

logger = logging.getLogger("calfuse_jax")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; `task` and `step` say where (step is 1-based)."""

    def __init__(self, task: int, step: int, value: float):
        self.task, self.step, self.value = task, step, value
        super().__init__(
            f"loss is {value} at task {task}, step {step}; the run stopped and the last good "
            "checkpoint is kept. Lower config.train.lr or check the features for NaN/Inf."
        )


class TrainState(NamedTuple):
    """What the step updates (and donates): head params and Adam state."""

    params: Any
    opt_state: Any


class TaskInputs(NamedTuple):
    """Arrays constant during a task, replicated; padded to all C classes of the stream so that
    every task has the same shapes and the step is traced and compiled once per run.

    Attributes:
      text: [C, D] unit text embeddings of every class, by position.
      ctx: the task's `calibration.TaskContext` (its `num_seen` classes enter the softmax; with
        `num_old` = 0, on the first task, the old-class terms are off).
      means: [C, D] stored class means (zero rows for classes without statistics yet).
      chols: [C, D, D] their Cholesky factors.
      pairs: int32 [P, 2] hard pairs (old i, new j), padded; pair_mask: float32 [P] 1 for real.
      teacher: previous task's head params (for distillation; the current ones on task 0).
      teacher_ctx: the previous task's context (this task's on task 0).
    """

    text: jax.Array
    ctx: calibration.TaskContext
    means: jax.Array
    chols: jax.Array
    pairs: jax.Array
    pair_mask: jax.Array
    teacher: Any
    teacher_ctx: calibration.TaskContext


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static (hashable) choices of a run's step; changing one means a new trace."""

    logit_scale: float
    pseudo_per_class: int  # floor(10 beta), 0 disables pseudo-features
    hard_per_class: int  # floor(20 beta), 0 disables the hinge
    hard_margin: float
    hard_weight: float
    kd_weight: float
    kd_temperature: float


def make_head(config: ml_collections.ConfigDict, dim: int) -> calibration.CalibratedHead:
    """The `CalibratedHead` of `config` for features of width `dim`: `config.calibration`'s
    fields are the head's gate settings, one to one."""
    gate = config.calibration.to_dict()
    return calibration.CalibratedHead(dim=dim, adapter_init=config.head.init, **gate)


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


def step_settings(config: ml_collections.ConfigDict, logit_scale: float):
    """The static settings of a run (task 0 switches the old-class terms off through masks).

    Raises ValueError for distillation without pseudo-features (`config.check_switches`).
    """
    check_switches(config)
    beta = float(config.pseudo.beta)
    use_pseudo = int(config.pseudo.classes_per_batch) > 0
    use_kd = float(config.loss.kd_weight) > 0
    use_hard = float(config.pseudo.hard_weight) > 0
    return StepSettings(
        logit_scale=float(logit_scale),
        pseudo_per_class=int(np.floor(10 * beta)) if use_pseudo else 0,
        hard_per_class=int(np.floor(20 * beta)) if use_hard else 0,
        hard_margin=float(config.pseudo.hard_margin),
        hard_weight=float(config.pseudo.hard_weight),
        kd_weight=float(config.loss.kd_weight) if use_kd else 0.0,
        kd_temperature=float(config.loss.kd_temperature),
    )


def head_apply(head, params, f0, text, ctx, settings: StepSettings):
    """(logits [B, C], calibrated features [B, D]) of the head on frozen features f0 [B, D]."""
    features, _ = head.apply({"params": params}, f0, ctx)
    return calibration.head_logits(features, text, settings.logit_scale), features


def old_class_samples(rng, inputs: TaskInputs, pseudo_ids, settings: StepSettings):
    """One Gaussian draw for both pseudo-features and hard-pair samples.

    Returns (features [K*n_p + P*n_h, D], labels [same]): rows of pseudo class k first (n_p
    each), then n_h rows of the old class of each hard pair. Drawing both in one call keeps the
    compiled step small; the samples are independent either way.
    """
    n_p, n_h = settings.pseudo_per_class, settings.hard_per_class
    block = math.gcd(n_p, n_h)  # gcd(n, 0) = n
    ids = []
    if n_p:
        ids.append(jnp.repeat(pseudo_ids, n_p // block))
    if n_h:
        ids.append(jnp.repeat(inputs.pairs[:, 0], n_h // block))
    ids = jnp.concatenate(ids).astype(jnp.int32)
    return stats.sample_pseudo(rng, inputs.means, inputs.chols, ids, block)


def loss_fn(params, batch, pseudo_ids, rng, inputs: TaskInputs, head, settings: StepSettings):
    """Total loss of one batch (DESIGN.md §2): CE on real + pseudo, hinge on hard pairs, KD.

    Args:
      batch: (features [B, D], positions int [B], mask float [B]) - padded rows have mask 0.
      pseudo_ids: int32 [K] old classes whose pseudo-features join this batch.
      rng: this step's key.
    Returns:
      (scalar loss, dict of its terms).
    """
    features, labels, mask = batch
    num_pseudo = pseudo_ids.shape[0] * settings.pseudo_per_class
    has_old = (inputs.ctx.num_old > 0).astype(jnp.float32)  # old-class terms are off on task 0
    if settings.pseudo_per_class or settings.hard_per_class:
        extra, extra_labels = old_class_samples(rng, inputs, pseudo_ids, settings)
        features = jnp.concatenate([features, extra])  # one pass of the head over everything
    logits, calibrated = head_apply(head, params, features, inputs.text, inputs.ctx, settings)
    real = labels.shape[0]
    terms = {}
    if settings.pseudo_per_class:
        pseudo_mask = jnp.full((num_pseudo,), has_old)
        labels = jnp.concatenate([labels, extra_labels[:num_pseudo].astype(labels.dtype)])
        mask = jnp.concatenate([mask, pseudo_mask])
        if settings.kd_weight:
            pseudo = extra[:num_pseudo]
            teacher, _ = head_apply(
                head, inputs.teacher, pseudo, inputs.text, inputs.teacher_ctx, settings
            )
            kd = losses.distillation_loss(
                logits[real : real + num_pseudo],
                jax.lax.stop_gradient(teacher),
                settings.kd_temperature,
                num_seen=inputs.ctx.num_old,
                mask=pseudo_mask,
            )
            terms["kd"] = settings.kd_weight * kd
    ce_rows = real + (num_pseudo if settings.pseudo_per_class else 0)
    terms["ce"] = losses.cross_entropy(
        logits[:ce_rows], labels, num_seen=inputs.ctx.num_seen, mask=mask
    )
    if settings.hard_per_class:
        n = settings.hard_per_class
        own = jnp.repeat(inputs.text[inputs.pairs[:, 0]], n, axis=0)  # [P * n, D]
        other = jnp.repeat(inputs.text[inputs.pairs[:, 1]], n, axis=0)
        pair_mask = jnp.repeat(inputs.pair_mask, n) * has_old
        hinge = losses.hinge_loss(calibrated[ce_rows:], own, other, settings.hard_margin, pair_mask)
        terms["hinge"] = settings.hard_weight * hinge
    return sum(terms.values()), terms


TRACES: collections.Counter = collections.Counter()  # traces of the jitted functions, by name
# (`evaluation` counts its own under "eval_counts")


def _train_step(state: TrainState, batch, pseudo_ids, step, lr, key, inputs, head, settings):
    TRACES["train_step"] += 1
    rng = jax.random.fold_in(key, step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, _), grads = grad_fn(state.params, batch, pseudo_ids, rng, inputs, head, settings)
    moments, opt_state = optimizer().update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda m: -lr * m, moments)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), loss


@functools.lru_cache(maxsize=16)
def train_step_fn(head, settings: StepSettings, mesh: Mesh):
    """The jitted step `(state, batch, pseudo_ids, step, lr, key, inputs) -> (state, loss)`.

    `state` is donated; outputs are replicated. Cached per (head, settings, mesh), so every task
    of a run (and every run of a process with the same settings) shares one compiled step.
    """
    step = functools.partial(_train_step, head=head, settings=settings)
    return jax.jit(step, donate_argnums=(0,), out_shardings=sharding.replicated(mesh))


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


@dataclasses.dataclass
class TaskRun:
    """Everything `train_task` needs besides the state; built by `continual`."""

    task: int
    features: np.ndarray  # [N, D] the task's training features
    labels: np.ndarray  # int [N] their positions
    old_ids: np.ndarray  # int [C_old] old class positions
    inputs: TaskInputs
    settings: StepSettings
    key: jax.Array  # the task's key, replicated


def check_losses(
    pending: list[tuple[int, jax.Array]],
    task: int,
    done: list[float],
    report: Callable[[list[int], np.ndarray], None] | None = None,
) -> None:
    """Fetches the losses of `pending` (step, loss) pairs into `done`, empties `pending`, and
    passes (steps, losses) to `report` when given.

    Raises NonFiniteLossError on the first NaN/Inf one.
    """
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
    head,
    config: ml_collections.ConfigDict,
    run: TaskRun,
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
    """Trains the head on one task from `start_step` (0, or a step checkpoint's step).

    Args:
      state: head params and the optimiser state matching `start_step`, replicated.
      save_step: called as `save_step(step, state, epoch_losses)` every `checkpoint_every_steps`
        steps and on KeyboardInterrupt (state after `step` completed steps; the losses of the
        current epoch so far, so a resumed run reports the same epoch loss).
      epoch_losses: those losses when resuming from a step checkpoint.
      step_callback: `step_callback(task, completed_steps)` after every step (tests use it to
        interrupt a run).
      loss_callback: `loss_callback(task, steps, losses, lrs)` whenever losses reach the host
        (every epoch and step checkpoint: no extra device sync); `steps` are completed-step
        counts 1..total, `lrs` the learning rate each of those steps used.

    Returns:
      (final state, info dict with `loss` (mean of the last epoch) and `steps`).
    Raises:
      NonFiniteLossError on a NaN/Inf loss (checked every epoch and before every step checkpoint).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415  (import cost only when training)

    batch_size = int(config.train.batch_size)
    epochs, seed = int(config.train.epochs), int(config.seed)
    epoch_steps = steps_per_epoch(len(run.labels), batch_size)
    total = epochs * epoch_steps
    padded = sharding.padded_size(batch_size, mesh)
    step_fn = train_step_fn(head, run.settings, mesh)
    every = int(config.train.checkpoint_every_steps)
    per_batch = int(config.pseudo.classes_per_batch)
    pending: list[tuple[int, jax.Array]] = []
    last_loss, step = None, start_step
    losses_so_far = list(epoch_losses or [])
    bar = tqdm(total=total, initial=start_step, desc=f"task {run.task}", disable=not progress)
    report = None
    if loss_callback is not None:

        def report(steps: list[int], values: np.ndarray) -> None:
            lrs = np.array([learning_rate(config, s - 1, epoch_steps) for s in steps])
            loss_callback(run.task, steps, values, lrs)

    try:
        for epoch in range(start_step // epoch_steps, epochs):
            order = epoch_permutation(seed, run.task, epoch, len(run.labels))
            pseudo = pseudo_class_schedule(
                seed, run.task, epoch, run.old_ids, epoch_steps, per_batch
            )
            for index in range(step - epoch * epoch_steps, epoch_steps):
                rows = order[index * batch_size : (index + 1) * batch_size]
                batch = sharding.shard_batch(
                    host_batch(run.features, run.labels, rows, padded), mesh
                )
                lr = learning_rate(config, step, epoch_steps)
                scalars = sharding.replicate((pseudo[index], np.int32(step), np.float32(lr)), mesh)
                state, loss = step_fn(state, batch, *scalars, run.key, run.inputs)
                step += 1
                pending.append((step, loss))
                bar.update(1)
                if save_step is not None and every and step % every == 0 and step < total:
                    check_losses(pending, run.task, losses_so_far, report)
                    save_step(step, state, losses_so_far)
                if step_callback is not None:
                    step_callback(run.task, step)
            check_losses(pending, run.task, losses_so_far, report)
            last_loss, losses_so_far = float(np.mean(losses_so_far)), []
            bar.set_postfix(loss=f"{last_loss:.4f}")
    except KeyboardInterrupt:
        _save_on_interrupt(pending, run.task, step, total, state, save_step, losses_so_far, report)
        raise
    finally:
        bar.close()
    return state, {"loss": last_loss, "steps": total}


def _save_on_interrupt(pending, task, step, total, state, save_step, losses, report) -> None:
    """Ctrl-C: keep the work done so far as a step checkpoint (unless it is unusable)."""
    if save_step is None or not 0 < step < total:
        return
    if any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state)):
        logger.warning("interrupted inside a step; no step checkpoint written for task %d", task)
        return
    check_losses(pending, task, losses, report)
    logger.warning("interrupted at task %d step %d; saving a step checkpoint", task, step)
    save_step(step, state, losses)
