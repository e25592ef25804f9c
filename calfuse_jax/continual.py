"""The class-incremental task loop: train -> class statistics -> fuse -> evaluate -> checkpoint.

`run_continual` drives a whole `FeatureStream`. After each task it writes a metrics row
(`metrics.jsonl`, `accuracy_matrix.csv`) and an Orbax checkpoint holding, with the earlier task
checkpoints, everything the next task needs (each stores only its own classes' statistics), so a
killed run resumes after the last finished task, or inside a task from the newest step
checkpoint, and replays bit for bit. A run folder belongs to one configuration (its
fingerprint is in `run_fingerprint.json`); a different one is refused unless `overwrite=True`,
which moves the old results aside into `overwritten-<time>/`. Only process 0 writes files; Orbax
checkpoints are collective.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from calfuse_jax import calibration, fusion, interrupt, methods, metrics, sharding, stats, train
from calfuse_jax.checkpoint import (
    RunCheckpoints,
    TaskCheckpointError,
    abstract_like,
    abstract_task_state,
    restore_class_stats,
    task_state,
)
from calfuse_jax.config import resolve_method
from calfuse_jax.data.stream import FeatureStream
from calfuse_jax.metrics import ContinualResult
from calfuse_jax.rundir import (
    ConfigMismatchError,
    config_fingerprint,
    prepare_workdir,
    write_results,
)
from calfuse_jax.rundir import jsonable as json_safe
from calfuse_jax.train import NonFiniteLossError, TrainState

logger = logging.getLogger("calfuse_jax")

__all__ = [
    "ConfigMismatchError",
    "ContinualResult",
    "NonFiniteLossError",
    "TaskCheckpointError",
    "run_continual",
]


@dataclasses.dataclass
class _Run:
    """Per-run constants shared by the helpers below."""

    stream: FeatureStream
    text: np.ndarray  # [C, D] unit text embeddings by position
    config: ml_collections.ConfigDict  # resolved
    mesh: Mesh
    method: methods.Method
    fingerprint: str
    checkpoints: RunCheckpoints
    workdir: Path
    progress: bool
    step_callback: Callable[[int, int], None] | None
    loss_callback: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None

    @property
    def num_tasks(self) -> int:
        return self.stream.split.num_tasks

    @property
    def writer(self) -> bool:
        return sharding.is_primary()


def _initial_params(run: _Run):
    """Head params from `config.seed`, replicated."""
    key = jax.random.fold_in(jax.random.PRNGKey(int(run.config.seed)), 1_000_003)
    return jax.jit(run.method.init, out_shardings=sharding.replicated(run.mesh))(key)


def _hard_pairs(run: _Run, task: int) -> np.ndarray:
    """int [P, 2] hard pairs (old, new) of `task` (none on task 0 or with the hinge off)."""
    split, config = run.stream.split, run.config
    old, seen = int(split.bounds[task]), int(split.bounds[task + 1])
    if task == 0 or float(config.pseudo.hard_weight) <= 0:
        return np.zeros((0, 2), np.int64)
    threshold = float(config.pseudo.hard_threshold)
    return stats.hard_pairs(run.text, np.arange(old), np.arange(old, seen), threshold)


def _padded_pairs(run: _Run, task: int) -> tuple[np.ndarray, np.ndarray]:
    """The task's pairs padded to the run's largest count (one shape, one compile) + mask."""
    pairs = _hard_pairs(run, task)
    size = max(max(len(_hard_pairs(run, t)) for t in range(run.num_tasks)), 1)
    padded = np.zeros((size, 2), np.int32)
    padded[: len(pairs)] = pairs
    return padded, (np.arange(size) < len(pairs)).astype(np.float32)


def _task_inputs(run: _Run, task: int, class_stats, teacher) -> methods.TaskInputs:
    """The replicated constants of `task`, padded to all C classes of the stream."""
    split = run.stream.split
    classes, dim = split.num_classes, run.stream.dim
    pairs, pair_mask = _padded_pairs(run, task)
    means = np.zeros((classes, dim), np.float32)
    chols = np.zeros((classes, dim, dim), np.float32)
    known = class_stats.num_classes
    means[:known], chols[:known] = np.asarray(class_stats.means), np.asarray(class_stats.chols)
    inputs = methods.TaskInputs(
        text=run.text,
        ctx=calibration.task_context(split.bounds, task),
        means=means,
        chols=chols,
        pairs=pairs,
        pair_mask=pair_mask,
        teacher=teacher,
        teacher_ctx=calibration.task_context(split.bounds, max(task - 1, 0)),
    )
    return sharding.replicate(inputs, run.mesh)


def _task_run(run: _Run, task: int, inputs: methods.TaskInputs) -> train.TaskRun:
    features, labels = run.stream.task(task, "train")
    key = jax.random.fold_in(jax.random.PRNGKey(int(run.config.seed)), task)
    return train.TaskRun(
        task=task,
        features=np.asarray(features, np.float32),
        labels=labels.astype(np.int32),
        old_ids=np.arange(int(run.stream.split.bounds[task])),
        inputs=inputs,
        key=sharding.replicate(key, run.mesh),
    )


def _fresh_carry(run: _Run) -> dict:
    num_tasks = run.num_tasks
    return {
        "params": _initial_params(run),
        "stats": stats.ClassStats.empty(run.stream.dim),
        "accuracy": np.full((num_tasks, num_tasks), np.nan, np.float32),
        "rows": [],
    }


def _check_meta(run: _Run, meta: dict, what: str) -> None:
    if meta.get("fingerprint") != run.fingerprint:
        raise ConfigMismatchError(
            f"{what} in {run.workdir} was written by another configuration "
            f"({meta.get('fingerprint')} != {run.fingerprint}); pass overwrite=True to start again"
        )


def _resume(run: _Run) -> tuple[dict, int]:
    """The carry after the last finished task (or a fresh one) and the next task index."""
    finished = run.checkpoints.finished_tasks()
    if not finished:
        return _fresh_carry(run), 0
    task = finished[-1]
    meta = run.checkpoints.task_meta(task)
    _check_meta(run, meta, f"task checkpoint {task}")
    placement = sharding.replicated(run.mesh)
    abstract_params = jax.eval_shape(lambda: _initial_params(run))
    state = run.checkpoints.restore_task(
        task, abstract_task_state(abstract_params, run.num_tasks, placement)
    )
    host = sharding.to_host({k: v for k, v in state.items() if k != "params"})
    bounds, dim = run.stream.split.bounds, run.stream.dim
    carry = {
        "params": state["params"],
        "stats": stats.ClassStats.from_dict(
            restore_class_stats(run.checkpoints, task, bounds, dim, placement)
        ),
        "accuracy": host["accuracy"],
        "rows": list(meta["rows"]),
    }
    logger.info("resuming %s after task %d of %d", run.workdir, task, run.num_tasks)
    return carry, task + 1


@functools.lru_cache(maxsize=8)
def _fresh_state_fn(mesh: Mesh):
    # A copy of the params: the step donates its state, and the carried params are still needed
    # (fusion base, distillation teacher).
    def fresh(params):
        return TrainState(jax.tree.map(jnp.copy, params), train.optimizer().init(params))

    return jax.jit(fresh, out_shardings=sharding.replicated(mesh))


def _start_state(run: _Run, task: int, params) -> tuple[TrainState, int, list[float]]:
    """(state, step, losses of the epoch so far) to start `task` from: fresh, or its newest step
    checkpoint."""
    fresh = _fresh_state_fn(run.mesh)(params)
    latest = run.checkpoints.latest_step()
    if latest is None or latest[0] != task:
        return fresh, 0, []
    abstract = abstract_like(fresh._asdict(), sharding.replicated(run.mesh))
    state, meta = run.checkpoints.restore_step(task, latest[1], abstract)
    _check_meta(run, meta, f"step checkpoint {latest}")
    logger.info("resuming task %d at step %d", task, latest[1])
    return TrainState(**state), latest[1], list(meta.get("epoch_losses", []))


def _train(run: _Run, task: int, carry: dict, inputs: methods.TaskInputs) -> tuple[Any, dict]:
    """Trains task `task` from the carried params; returns (params, info)."""
    if not run.method.trains:
        return carry["params"], {"loss": None, "steps": 0}
    state, start, losses = _start_state(run, task, carry["params"])

    def save_step(step: int, state: TrainState, epoch_losses: list[float]) -> None:
        meta = {"task": task, "step": step, "fingerprint": run.fingerprint}
        meta["epoch_losses"] = epoch_losses
        run.checkpoints.save_step(task, step, state._asdict(), meta)

    report = None
    if run.loss_callback is not None:
        # Steps counted across tasks, so every task's curve continues the previous one.
        epochs, batch_size = int(run.config.train.epochs), int(run.config.train.batch_size)
        sizes = [len(run.stream.task(t, "train")[1]) for t in range(task)]
        offset = sum(epochs * train.steps_per_epoch(n, batch_size) for n in sizes)

        def report(task, steps, losses, lrs):
            run.loss_callback(task, offset + np.asarray(steps), losses, lrs)

    state, info = train.train_task(
        run.method,
        run.config,
        _task_run(run, task, inputs),
        state,
        run.mesh,
        start_step=start,
        save_step=save_step,
        epoch_losses=losses,
        step_callback=run.step_callback,
        loss_callback=report,
        progress=run.progress,
    )
    return state.params, info


def _run_task(run: _Run, task: int, carry: dict) -> dict:
    """Train -> statistics -> fuse -> evaluate -> checkpoint for one task; returns the new carry."""
    split, config = run.stream.split, run.config
    old, seen = int(split.bounds[task]), int(split.bounds[task + 1])
    # Statistics of the frozen features of the new classes (training leaves them unchanged; the
    # step samples old classes only, and a method may read the new means, e.g. NCM).
    features, labels = run.stream.task(task, "train")
    means, covs = stats.class_stats(
        features, labels, np.arange(old, seen), float(config.stats.cov_eps), config.stats.shrinkage
    )
    class_stats = carry["stats"].extend(means, stats.cholesky_factors(covs))
    inputs = _task_inputs(run, task, class_stats, carry["params"])
    started = time.perf_counter()
    params, info = _train(run, task, carry, inputs)
    train_seconds = time.perf_counter() - started
    if task > 0 and run.method.trains:
        rules, bias = run.method.fusion_rules, float(config.fusion.mix_bias)
        params = fusion.fuse_params(carry["params"], params, rules, bias)
        params = sharding.replicate(params, run.mesh)  # keep one layout for every compiled use
    correct, total = _evaluate(run, task, params, inputs)
    accuracy, curve = metrics.record_task(carry["accuracy"], correct, total, split.bounds, task)
    row = metrics.metrics_row(task, seen, accuracy, curve, info, train_seconds)
    new = {"params": params, "stats": class_stats, "accuracy": accuracy}
    new["rows"] = [*carry["rows"], row]
    _save_task(run, task, new)
    logger.info(
        "task %d/%d: seen-class accuracy %.2f%% (old %.2f, new %.2f), %.1fs",
        task + 1, run.num_tasks, *curve, train_seconds,
    )  # fmt: skip
    return new


def _evaluate(run: _Run, task: int, params, inputs: methods.TaskInputs):
    """(correct [C], count [C]) on the test features of every class seen after `task`."""
    features, labels = run.stream.seen(task, "test")
    # One batch size for the whole run (the largest test set), so one compiled evaluation.
    batch_size = min(int(run.config.train.eval_batch_size), len(run.stream.test_labels))
    return train.evaluate(run.method, params, features, labels, inputs, run.mesh, batch_size)


def _save_task(run: _Run, task: int, carry: dict) -> None:
    # Only the statistics of this task's classes: earlier ones are in earlier task checkpoints.
    state, new_stats = task_state(carry, int(run.stream.split.bounds[task]))
    state, new_stats = sharding.replicate((state, new_stats), run.mesh)
    meta = {
        "task": task,
        "fingerprint": run.fingerprint,
        "config": run.config.to_dict(),
        "rows": [{k: json_safe(v) for k, v in row.items()} for row in carry["rows"]],
    }
    meta = json.loads(json.dumps(meta, default=str))
    run.checkpoints.save_task(task, state, meta, new_stats=new_stats)
    if run.writer:
        write_results(run.workdir, carry["rows"], carry["accuracy"])


def _unit_rows(text: np.ndarray) -> np.ndarray:
    """float32 [C, D] rows scaled to unit norm (a zero row stays zero)."""
    text = np.asarray(text, np.float32)
    return text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)


def _open_run(stream, text_features, config, workdir, overwrite, mesh, logit_scale, **hooks):
    """The `_Run` of `run_continual`'s arguments: checks the inputs, claims `workdir` for this
    config (`rundir.prepare_workdir`) and logs the fusion plan; `hooks`: progress, callbacks."""
    config = resolve_method(config)  # a bad fusion rule stops here, before anything is written
    stream.check(text_features)
    scale = float(config.logit_scale if logit_scale is None else logit_scale)
    workdir = Path(workdir).absolute()
    doc = config_fingerprint(config, stream, scale)
    prepare_workdir(workdir, doc, overwrite)
    run = _Run(
        stream=stream,
        text=_unit_rows(stream.text_by_position(text_features)),
        config=config,
        mesh=mesh if mesh is not None else sharding.make_mesh(),
        method=methods.REGISTRY[config.method].build(config, stream.dim, scale),
        fingerprint=doc["fingerprint"],
        checkpoints=RunCheckpoints(workdir / "checkpoints"),
        workdir=workdir,
        **hooks,
    )
    plan = fusion.fusion_plan(jax.eval_shape(lambda: _initial_params(run)), run.method.fusion_rules)
    logger.info("fusion after each task (fusion.rules):\n%s", fusion.format_plan(plan))
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
      step_callback: `fn(task, completed_steps)` after every training step (tests, monitoring).
      loss_callback: `fn(task, steps, losses, lrs)` as the training losses reach the host (each
        epoch and step checkpoint); `steps` count across tasks (1 + the steps of earlier tasks
        for task t's first), `lrs` are the learning rates those steps used. A resumed run
        reports from the step it restarts at.

    Raises:
      ValueError on bad inputs, ConfigMismatchError for a foreign workdir, TaskCheckpointError
      when resuming needs an earlier task checkpoint that is missing or damaged (each holds only
      its own classes' statistics), NonFiniteLossError when the loss turns NaN/Inf (the last
      good checkpoint is kept). Ctrl-C or SIGTERM stops the run at the next step (or task) with
      a step checkpoint saved and raises `interrupt.Interrupted`, a KeyboardInterrupt.
    """
    run = _open_run(
        stream, text_features, config, workdir, overwrite, mesh, logit_scale,
        progress=progress, step_callback=step_callback, loss_callback=loss_callback,
    )  # fmt: skip
    try:
        carry, start = _resume(run)
        if run.writer:
            write_results(run.workdir, carry["rows"], carry["accuracy"])
        with interrupt.deferred():  # a signal stops the run between steps or tasks, saved
            for task in range(start, run.num_tasks):
                if signum := interrupt.requested():
                    raise interrupt.Interrupted(signum, f"before task {task} (earlier ones saved)")
                carry = _run_task(run, task, carry)
    except NonFiniteLossError as error:
        logger.error("%s", error)
        raise
    finally:
        run.checkpoints.close()
    host = {**carry, "params": sharding.to_host(carry["params"])}
    return metrics.continual_result(host, run.workdir)
