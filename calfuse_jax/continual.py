"""The class-incremental task loop: train -> class statistics -> fuse -> evaluate -> checkpoint.

Each finished task writes metrics and a checkpoint, so a killed run resumes and replays bit for
bit. Only process 0 writes files; Orbax checkpoints are collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct
from jax.sharding import Mesh

from calfuse_jax import calibration, fusion, methods, metrics, rundir, sharding, stats, train
from calfuse_jax.checkpoint import RunCheckpoints, TaskCheckpointError, abstract_like, task_meta
from calfuse_jax.config import resolve_method
from calfuse_jax.data.stream import FeatureStream
from calfuse_jax.interrupt import Interrupted, deferred, requested
from calfuse_jax.metrics import ContinualResult
from calfuse_jax.rundir import ConfigMismatchError
from calfuse_jax.train import NonFiniteLossError, TrainState

logger = logging.getLogger("calfuse_jax")

__all__ = ["ConfigMismatchError", "ContinualResult", "NonFiniteLossError", "TaskCheckpointError",
           "run_continual"]  # fmt: skip


@struct.dataclass
class ContinualState:
    """What one task hands the next (a pytree; `rows` is static)."""

    params: Any  # head params, replicated
    means: jax.Array  # [C, D] class means of all C classes, zero until a class has statistics
    chols: jax.Array  # [C, D, D] their Cholesky factors (zero likewise)
    accuracy: np.ndarray  # float32 [T, T] accuracy matrix so far (NaN: not evaluated), host
    rows: tuple = struct.field(pytree_node=False, default=())  # metrics rows of finished tasks


@dataclasses.dataclass(frozen=True)
class Run:
    """The constants of one `run_continual` call (`open_run`; `seeds` opens several)."""

    stream: FeatureStream
    text: jax.Array  # [C, D] unit text embeddings by position, replicated
    pairs: np.ndarray  # int32 [T, P, 2] each task's hard pairs (old, new), padded
    pair_mask: np.ndarray  # float32 [T, P] 1 for a real pair
    config: ml_collections.ConfigDict  # resolved
    mesh: Mesh
    method: methods.Method
    fingerprint: str
    checkpoints: RunCheckpoints
    workdir: Path
    capacity: int  # training rows of the largest task, padded to the mesh (one epoch shape)
    progress: bool
    step_callback: Callable[[int, int], None] | None
    loss_callback: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None


def initial_params(method: methods.Method, config, mesh: Mesh):
    """`method`'s head params from `config.seed`, replicated (the start of every run)."""
    key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 1_000_003)
    return jax.jit(method.init, out_shardings=sharding.replicated(mesh))(key)


def _fresh_state(run: Run) -> ContinualState:
    split, dim, placement = run.stream.split, run.stream.dim, sharding.replicated(run.mesh)
    means = jnp.zeros((split.num_classes, dim), device=placement)
    chols = jnp.zeros((split.num_classes, dim, dim), device=placement)
    accuracy = np.full((split.num_tasks, split.num_tasks), np.nan, np.float32)
    return ContinualState(initial_params(run.method, run.config, run.mesh), means, chols, accuracy)


def _training_sizes(stream: FeatureStream, method) -> list[int]:
    """How many rows each task trains on (all seen classes' for a `joint` method)."""
    positions, bounds = stream.split.to_positions(stream.train_labels), stream.split.bounds
    joint = getattr(method, "joint", False)
    return [
        int(np.sum((positions >= (0 if joint else lo)) & (positions < hi)))
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def start_task(run: Run, task: int, state: ContinualState, shared: ContinualState | None = None):
    """(`state` with the statistics of `task`'s classes filled in before training, its
    `TaskView`); `shared`: a started run trained together with this one, whose statistics it
    takes."""
    config, bounds = run.config, run.stream.split.bounds
    old, seen = int(bounds[task]), int(bounds[task + 1])
    joint = getattr(run.method, "joint", False)
    features, labels = (run.stream.seen if joint else run.stream.task)(task, "train")
    if shared is not None:
        means, chols = shared.means, shared.chols
    else:
        eps, shrinkage = float(config.stats.cov_eps), config.stats.shrinkage
        means, covs = stats.class_stats(features, labels, np.arange(old, seen), eps, shrinkage)
        means, chols = sharding.replicate((means, stats.cholesky_factors(covs)), run.mesh)
        hint = "raise config.stats.cov_eps (a covariance is not positive-definite) or check "
        hint += "the features"
        quantity = "the class statistics (means, Cholesky factors)"
        train.check_finite((means, chols), task, quantity, hint)
        means, chols = state.means.at[old:seen].set(means), state.chols.at[old:seen].set(chols)
    inputs = methods.TaskInputs(
        text=run.text,
        ctx=calibration.task_context(bounds, task),
        means=means,
        chols=chols,
        pairs=run.pairs[task],
        pair_mask=run.pair_mask[task],
        teacher=state.params,
        teacher_ctx=calibration.task_context(bounds, max(task - 1, 0)),
        floats=methods.step_floats(config),
    )
    key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), task)
    key, inputs = sharding.replicate((key, inputs), run.mesh)
    features, labels = np.asarray(features, np.float32), labels.astype(np.int32)
    view = train.TaskView(task, len(bounds) - 1, features, labels, run.capacity, key, inputs)
    return state.replace(means=means, chols=chols), view


def _check_meta(run: Run, meta: dict, what: str) -> None:
    if meta.get("fingerprint") != run.fingerprint:
        raise ConfigMismatchError(
            f"{what} in {run.workdir} was written by another configuration "
            f"({meta.get('fingerprint')} != {run.fingerprint}); pass overwrite=True to start again"
        )


def resume(run: Run) -> tuple[ContinualState, int]:
    """The state after the last finished task (or a fresh one) and the next task index."""
    finished = run.checkpoints.finished_tasks()
    if not finished:
        return _fresh_state(run), 0
    task = finished[-1]
    meta = run.checkpoints.task_meta(task)
    _check_meta(run, meta, f"task checkpoint {task}")
    placement = sharding.replicated(run.mesh)
    num_tasks = run.stream.split.num_tasks
    saved = run.checkpoints.restore_head(task, run.method.init, num_tasks, placement)
    bounds, dim = run.stream.split.bounds, run.stream.dim
    class_stats = run.checkpoints.class_stats(task, bounds, dim, placement)
    means, chols = sharding.replicate((class_stats["means"], class_stats["chols"]), run.mesh)
    accuracy = sharding.to_host(saved["accuracy"])
    about = rundir.about(run.workdir)
    logger.info("resuming %s after task %d of %d", run.workdir, task, len(bounds) - 1, extra=about)
    return ContinualState(saved["params"], means, chols, accuracy, tuple(meta["rows"])), task + 1


@functools.lru_cache(maxsize=8)
def _fresh_train_state_fn(mesh: Mesh):
    # A copy: the step donates its state, and the params are still needed (fusion, teacher).
    def fresh(params):
        return TrainState(jax.tree.map(jnp.copy, params), train.optimizer().init(params))

    return jax.jit(fresh, out_shardings=sharding.replicated(mesh))


def start_state(run: Run, task: int, params) -> tuple[TrainState, int]:
    """(state, step) to start `task` from: fresh, or its newest step checkpoint."""
    fresh = _fresh_train_state_fn(run.mesh)(params)
    latest = run.checkpoints.latest_step()
    if latest is None or latest[0] != task:
        return fresh, 0
    abstract = abstract_like(fresh._asdict(), sharding.replicated(run.mesh))
    state, meta = run.checkpoints.restore_step(task, latest[1], abstract)
    _check_meta(run, meta, f"step checkpoint {latest}")
    logger.info("resuming task %d at step %d", task, latest[1], extra=rundir.about(run.workdir))
    return TrainState(**state), latest[1]


def step_saver(run: Run, task: int) -> Callable[[int, TrainState], None]:
    """`save_step(step, state)`: a step checkpoint of `task` in `run`'s workdir."""

    def save_step(step: int, state: TrainState) -> None:
        meta = dict(task=task, step=step, fingerprint=run.fingerprint)
        run.checkpoints.save_step(task, step, state._asdict(), meta)

    return save_step


def loss_report(run: Run, task: int):
    """`run.loss_callback` with steps counted across tasks, or None."""
    if run.loss_callback is None:
        return None
    epochs, batch_size = int(run.config.train.epochs), int(run.config.train.batch_size)
    sizes = _training_sizes(run.stream, run.method)[:task]
    offset = sum(epochs * train.steps_per_epoch(n, batch_size) for n in sizes)

    def report(task, steps, losses, lrs):
        run.loss_callback(task, offset + np.asarray(steps), losses, lrs)

    return report


def _run_task(run: Run, task: int, state: ContinualState) -> ContinualState:
    """Statistics -> train -> fuse -> evaluate -> checkpoint for one task; returns the new state."""
    state, view = start_task(run, task, state)
    started = time.perf_counter()
    if hasattr(run.method, "update"):  # closed-form state (FeCAM, RanPAC), once per task
        params = run.method.update(state.params, view.features, view.labels, view.key, view.inputs)
        state = state.replace(params=sharding.replicate(params, run.mesh))
    params, info = state.params, {"loss": None, "steps": 0}
    if run.method.trains:
        trained, start = start_state(run, task, state.params)
        trained, info = train.train_task(
            run.method, run.config, view, trained, run.mesh,
            start_step=start, save_step=step_saver(run, task), step_callback=run.step_callback,
            loss_callback=loss_report(run, task), progress=run.progress,
        )  # fmt: skip
        params = trained.params
    return finish_task(run, state, view, params, info, time.perf_counter() - started)


def finish_task(run: Run, state: ContinualState, view, params, info, train_seconds: float):
    """Fuse -> evaluate -> checkpoint once `view`'s task trained `params`; the new state."""
    split, config, task = run.stream.split, run.config, view.task
    if task > 0 and run.method.trains:
        rules, bias = run.method.fusion_rules, float(config.fusion.mix_bias)
        params = fusion.fuse_params(state.params, params, rules, bias)
        params = sharding.replicate(params, run.mesh)  # keep one layout for every compiled use
        hint = "check config.fusion.mix_bias and config.fusion.rules"
        train.check_finite(params, task, "the fused head parameters", hint)  # before the save
    features, labels = run.stream.seen(task, "test")
    # One batch size for the whole run (the largest test set), so one compiled evaluation.
    batch_size = min(int(config.train.eval_batch_size), len(run.stream.test_labels))
    correct, total = train.evaluate(
        run.method, params, features, labels, view.inputs, run.mesh, batch_size
    )
    accuracy, curve = metrics.record_task(state.accuracy, correct, total, split.bounds, task)
    seen = int(split.bounds[task + 1])
    row = metrics.metrics_row(task, seen, accuracy, curve, info, train_seconds)
    state = state.replace(params=params, accuracy=accuracy, rows=(*state.rows, row))
    # Only the statistics of this task's classes: earlier ones are in earlier task checkpoints.
    old = int(split.bounds[task])
    items = (
        {"params": state.params, "accuracy": state.accuracy},
        {"means": state.means[old:seen], "chols": state.chols[old:seen]},
    )
    saved, new_stats = sharding.replicate(items, run.mesh)
    meta = task_meta(task, run.fingerprint, config.to_dict(), state.rows)
    run.checkpoints.save_task(task, saved, meta, new_stats=new_stats)
    write_results(run, state)
    logger.info(
        "task %d (%d/%d): seen-class accuracy %.2f%% (old %.2f, new %.2f), %.1fs%s",
        task, task + 1, split.num_tasks, *curve, train_seconds,
        f" ({view.members[0]})" if view.members else "", extra=rundir.about(run.workdir),
    )  # fmt: skip
    return state


def write_results(run: Run, state: ContinualState) -> None:
    """`run`'s metrics files up to `state` (process 0 only)."""
    if sharding.is_primary():
        rundir.write_results(run.workdir, list(state.rows), state.accuracy)


def unit_rows(text: np.ndarray) -> np.ndarray:
    """float32 [C, D] rows of `text` scaled to unit length (zero rows stay zero)."""
    text = np.asarray(text, np.float32)
    return text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)


def open_run(stream, text_features, config, workdir, overwrite, mesh, logit_scale, **hooks):
    """The `Run` of `run_continual`'s arguments (claims `workdir`, logs the fusion plan)."""
    config = resolve_method(config)  # a bad fusion rule stops here, before anything is written
    stream.check(text_features)
    scale = float(config.logit_scale if logit_scale is None else logit_scale)
    workdir = Path(workdir).absolute()
    doc = rundir.config_fingerprint(config, stream, scale)
    rundir.prepare_workdir(workdir, doc, overwrite)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    text = unit_rows(stream.text_by_position(text_features))
    build = methods.REGISTRY[config.method].build
    method = build(config, stream.dim, scale, stream.split.num_classes)
    run = Run(
        stream,
        sharding.replicate(text, mesh),
        *stats.task_hard_pairs(text, stream.split.bounds, config.pseudo),
        config=config,
        mesh=mesh,
        method=method,
        fingerprint=doc["fingerprint"],
        checkpoints=RunCheckpoints(workdir / "checkpoints"),
        workdir=workdir,
        capacity=sharding.padded_size(max(_training_sizes(stream, method)), mesh),
        **hooks,
    )
    params = jax.eval_shape(lambda: initial_params(run.method, run.config, run.mesh))
    plan = fusion.format_plan(fusion.fusion_plan(params, run.method.fusion_rules))
    logger.info("fusion after each task (fusion.rules):\n%s", plan, extra=rundir.about(workdir))
    return run


def run_continual(
    stream: FeatureStream,
    text_features: np.ndarray,
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    overwrite: bool = False,
    mesh: Mesh | None = None,
    progress: bool = True,
    logit_scale: float | None = None,
    step_callback: Callable[[int, int], None] | None = None,
    loss_callback: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
) -> ContinualResult:
    """Runs (or resumes) the whole class-incremental sequence of `stream`.

    Args:
      stream: frozen image features and labels, with the task split.
      text_features: [C_dataset, D] class text embeddings by dataset label (normalised here).
      config: `method_config()` fields (extra fields are ignored); `method` picks the preset.
      workdir: run folder (metrics files, `checkpoints/`); resumed if it holds this config's run.
      overwrite: move a different run found in `workdir` aside instead of refusing.
      mesh: device mesh with a `data` axis (default: all devices).
      progress: tqdm progress bars.
      logit_scale: CLIP's logit scale; None takes `config.logit_scale`.
      step_callback: `fn(task, completed_steps)` after every training epoch (tests, monitoring).
      loss_callback: `fn(task, steps, losses, lrs)` after each epoch; `steps` count across tasks
        (task t starts at 1 + the earlier tasks' steps), `lrs` are the learning rates those steps
        used. A resumed run reports from the step it restarts at.

    Raises:
      ValueError on bad inputs, ConfigMismatchError for a foreign workdir, TaskCheckpointError
      when resuming needs an earlier task checkpoint that is missing or damaged (each holds only
      its own classes' statistics), NonFiniteLossError when the loss turns NaN/Inf (the last
      good checkpoint is kept). Ctrl-C or SIGTERM stops the run at the next epoch (or task) with
      a step checkpoint saved and raises `interrupt.Interrupted`, a KeyboardInterrupt.
    """
    with deferred():  # a signal, even while opening or compiling, stops at a saved point
        run = open_run(
            stream, text_features, config, workdir, overwrite, mesh, logit_scale,
            progress=progress, step_callback=step_callback, loss_callback=loss_callback,
        )  # fmt: skip
        with closing_checkpoints([run]):
            state, start = resume(run)
            write_results(run, state)
            for task in range(start, run.stream.split.num_tasks):
                if signum := requested():
                    raise Interrupted(signum, f"before task {task} (earlier ones saved)")
                state = _run_task(run, task, state)
    return result_of(run, state)


@contextlib.contextmanager
def closing_checkpoints(runs: list[Run]):
    """Closes the runs' checkpoints on the way out, logging a NonFiniteLossError."""
    try:
        yield
    except NonFiniteLossError as error:
        logger.error("%s", error)
        raise
    finally:
        for run in runs:
            run.checkpoints.close()


def result_of(run: Run, state: ContinualState) -> ContinualResult:
    """The `ContinualResult` of a finished `state`, on the host."""
    host = sharding.to_host(state)
    class_stats = stats.ClassStats(host.means, host.chols)
    return metrics.continual_result(
        host.accuracy, list(host.rows), host.params, class_stats, run.workdir
    )
