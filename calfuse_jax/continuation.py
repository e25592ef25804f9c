"""A finished run takes more tasks: new classes appended to its class order, in a new folder.

    stream, text = extend_stream(old_stream, old_text, new_stream, new_text)  # old tasks, then new
    result = continue_run("runs/old", stream, text, config, "runs/old+new")

The new folder gets the old task checkpoints grown to the longer stream, so `run_continual`
resumes after the old last task as if the whole stream had run in one go.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from calfuse_jax import methods, rundir, sharding
from calfuse_jax.checkpoint import RunCheckpoints, task_meta
from calfuse_jax.config import resolve_method
from calfuse_jax.continual import initial_params, run_continual
from calfuse_jax.data.protocol import TaskSplit
from calfuse_jax.data.stream import FeatureStream
from calfuse_jax.metrics import ContinualResult

RECORD_FILE = "continued_from.json"  # which run this one continues, and the classes it added


class ContinuationError(ValueError):
    """A run that cannot be continued with the given stream; the message says why and the fix."""


def first_tasks(stream: FeatureStream, num_tasks: int) -> FeatureStream:
    """`stream` cut to its first `num_tasks` tasks (their classes' rows, in the same order)."""
    bounds = stream.split.bounds[: num_tasks + 1]
    split = TaskSplit(stream.split.class_order[: bounds[-1]], bounds)
    train, test = (np.isin(y, split.class_order) for y in (stream.train_labels, stream.test_labels))
    return FeatureStream(
        stream.train_features[train], stream.train_labels[train],
        stream.test_features[test], stream.test_labels[test], split, stream.class_names,
    )  # fmt: skip


def extend_stream(old: FeatureStream, old_text, new: FeatureStream, new_text):
    """(stream, text features): `old`'s tasks, then `new`'s, whose dataset labels shift past
    `old`'s (by len(old_text)); ContinuationError when the feature widths or class names clash."""
    old_text, new_text = np.asarray(old_text, np.float32), np.asarray(new_text, np.float32)
    if new.dim != old.dim or new_text.shape[1] != old_text.shape[1]:
        raise ContinuationError(
            f"the new classes' features are {new.dim}-d but the run's are {old.dim}-d: extract "
            "them with the CLIP weights the run was trained with"
        )
    clash = sorted(set(old.class_names or ()) & set(new.class_names or ()))
    if clash:
        raise ContinuationError(
            f"the classes {', '.join(map(repr, clash[:10]))} already exist in the run; rename or "
            "leave out those class folders (a class is continued by name, not by its images)"
        )
    offset = len(old_text)
    order = np.concatenate([old.split.class_order, new.split.class_order + offset])
    bounds = np.concatenate([old.split.bounds, old.split.bounds[-1] + new.split.bounds[1:]])
    both = old.class_names is not None and new.class_names is not None
    names = (*old.class_names, *new.class_names) if both else None
    stream = FeatureStream(
        np.concatenate([old.train_features, new.train_features]),
        np.concatenate([old.train_labels, new.train_labels + offset]),
        np.concatenate([old.test_features, new.test_features]),
        np.concatenate([old.test_labels, new.test_labels + offset]),
        TaskSplit(order, bounds),
        names,
    )
    return stream, np.concatenate([old_text, new_text])


def finished_run(workdir: str | os.PathLike) -> tuple[int, dict]:
    """(number of tasks, meta of its last task) of the finished run in `workdir` (read only)."""
    workdir = Path(workdir).absolute()
    if not (workdir / "checkpoints" / "tasks").is_dir():
        raise ContinuationError(f"{workdir} holds no run with finished tasks (no checkpoints/)")
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    try:
        finished = checkpoints.finished_tasks()
        if not finished:
            raise ContinuationError(f"{workdir} holds no finished task: train the run first")
        shapes = checkpoints.task_shapes(finished[-1], "state") or {}
        num_tasks = shapes.get("accuracy", (0,))[0]
        if finished != list(range(num_tasks)):
            raise ContinuationError(
                f"the run in {workdir} is unfinished (finished tasks {finished} of "
                f"0..{num_tasks - 1}): run its command again to finish it, then continue it"
            )
        return num_tasks, checkpoints.task_meta(finished[-1])
    finally:
        checkpoints.close()


def _grown(old: Any, fresh: Any, what: str) -> Any:
    """`fresh` (the new run's initial value) with `old` written over its leading block."""

    def grow(path, old_leaf, fresh_leaf):
        if old_leaf.shape == fresh_leaf.shape:
            return old_leaf
        if old_leaf.ndim != fresh_leaf.ndim or any(
            o > f for o, f in zip(old_leaf.shape, fresh_leaf.shape, strict=True)
        ):
            raise ContinuationError(
                f"{what} {jax.tree_util.keystr(path)} has shape {old_leaf.shape} in the old run "
                f"and {fresh_leaf.shape} in the continued one: it cannot grow with the classes"
            )
        block = tuple(slice(0, n) for n in old_leaf.shape)
        return fresh_leaf.at[block].set(old_leaf)

    return jax.tree_util.tree_map_with_path(grow, old, fresh)


def _copy_tasks(
    old_dir: Path, target: Path, stream, config, doc: dict, num_tasks: int, method_old, method, mesh
) -> None:
    """The old task checkpoints in `target`, grown from `method_old`'s classes to `method`'s."""
    placement = sharding.replicated(mesh)
    old, new = RunCheckpoints(old_dir), RunCheckpoints(target)
    try:
        bounds = stream.split.bounds[: num_tasks + 1]
        class_stats = old.class_stats(num_tasks - 1, bounds, stream.dim, placement)
        fresh = initial_params(method, config, mesh)
        size = stream.split.num_tasks
        for task in range(num_tasks):
            saved = old.restore_head(task, method_old.init, num_tasks, placement)
            saved = sharding.to_host(saved)
            grown = np.full((size, size), np.nan, np.float32)
            grown[:num_tasks, :num_tasks] = saved["accuracy"]
            state = {"params": _grown(saved["params"], fresh, "head parameter"),
                     "accuracy": grown}  # fmt: skip
            lo, hi = int(bounds[task]), int(bounds[task + 1])
            own = {name: class_stats[name][lo:hi] for name in ("means", "chols")}
            rows = old.task_meta(task)["rows"]
            meta = task_meta(task, doc["fingerprint"], config.to_dict(), rows)
            state, own = sharding.replicate((state, own), mesh)
            new.save_task(task, state, meta, new_stats=own)
    finally:
        old.close()
        new.close()


def seed_continuation(
    old_workdir: str | os.PathLike,
    stream: FeatureStream,
    text_features: np.ndarray,
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    logit_scale: float | None = None,
    mesh=None,
) -> dict:
    """Prepares `workdir` so that `run_continual(stream, text_features, config, workdir)`
    resumes after the last task of the finished run in `old_workdir` (see the module doc);
    returns the record also written to `workdir/continued_from.json`. A `workdir` that already
    holds task checkpoints (a continuation started earlier) is left to `run_continual`'s resume.

    Raises:
      ContinuationError when the old run is unfinished, `stream` adds no task, or the first
      tasks of `stream` with `config` are not the old run (another fingerprint).
    """
    old_workdir, workdir = Path(old_workdir).absolute(), Path(workdir).absolute()
    if workdir == old_workdir:
        raise ContinuationError(f"continue {old_workdir} into another folder, never into itself")
    config = resolve_method(config)
    scale = float(config.logit_scale if logit_scale is None else logit_scale)
    num_tasks, meta = finished_run(old_workdir)
    split = stream.split
    if split.num_tasks <= num_tasks:
        raise ContinuationError(
            f"the stream has {split.num_tasks} tasks and the run in {old_workdir} finished "
            f"{num_tasks}: give a stream with the old tasks followed by new ones (extend_stream)"
        )
    own = rundir.config_fingerprint(config, first_tasks(stream, num_tasks), scale)["fingerprint"]
    if own != meta["fingerprint"]:
        raise ContinuationError(
            f"the first {num_tasks} tasks of this stream with this config are not the run in "
            f"{old_workdir} (fingerprint {own} != {meta['fingerprint']}): continue it with its "
            "own config, class order and data"
        )
    old_classes = int(split.bounds[num_tasks])
    record = {
        "run": str(old_workdir), "fingerprint": meta["fingerprint"], "tasks": num_tasks,
        "classes": old_classes, "added_tasks": split.num_tasks - num_tasks,
        "added_labels": split.class_order[old_classes:].tolist(),
        "added_names": [stream.class_names[label] for label in split.class_order[old_classes:]]
        if stream.class_names else None,
    }  # fmt: skip
    if (workdir / "checkpoints").exists():  # renamed into place complete: a started continuation
        return record
    _seed(old_workdir, stream, config, workdir, scale, mesh, num_tasks)
    if sharding.is_primary():
        rundir.write_json(workdir / RECORD_FILE, record)
    return record


def _seed(old_workdir: Path, stream, config, workdir: Path, scale: float, mesh, num_tasks: int):
    mesh = mesh if mesh is not None else sharding.make_mesh()
    doc = rundir.config_fingerprint(config, stream, scale)
    build, split = methods.REGISTRY[config.method].build, stream.split
    method_old = build(config, stream.dim, scale, int(split.bounds[num_tasks]))
    method = build(config, stream.dim, scale, split.num_classes)
    if sharding.is_primary():
        workdir.mkdir(parents=True, exist_ok=True)
    rundir.prepare_workdir(workdir, doc, overwrite=False)  # refuses another run's folder
    partial = workdir / "checkpoints.partial"  # renamed when complete: never taken half-copied
    if sharding.is_primary():
        shutil.rmtree(partial, ignore_errors=True)
    sharding.barrier("calfuse_continuation_start")
    old_dir = old_workdir / "checkpoints"
    _copy_tasks(old_dir, partial, stream, config, doc, num_tasks, method_old, method, mesh)
    if sharding.is_primary():
        os.replace(partial, workdir / "checkpoints")
    sharding.barrier("calfuse_continuation_seeded")


def continue_run(
    old_workdir: str | os.PathLike,
    stream: FeatureStream,
    text_features: np.ndarray,
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    logit_scale: float | None = None,
    mesh=None,
    **kwargs,
) -> ContinualResult:
    """`seed_continuation`, then `run_continual` (with `kwargs`) of the continued run."""
    seed_continuation(old_workdir, stream, text_features, config, workdir,
                      logit_scale=logit_scale, mesh=mesh)  # fmt: skip
    return run_continual(stream, text_features, config, workdir, mesh=mesh,
                         logit_scale=logit_scale, **kwargs)  # fmt: skip
