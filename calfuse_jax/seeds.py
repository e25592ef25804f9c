"""Runs of one stream trained together: one vmapped program over a leading axis of runs.

Runs that differ only in `TOGETHER` share the stream, class statistics and shapes; `run_seeds`
keeps a run folder per run and trains the runs that agree together, the others one by one.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from calfuse_jax import continual, methods, rundir, sharding, train
from calfuse_jax.data.stream import FeatureStream
from calfuse_jax.interrupt import Interrupted, deferred, requested
from calfuse_jax.metrics import ContinualResult

logger = logging.getLogger("calfuse_jax")

# The config fields in which runs trained together may differ.
TOGETHER = ("seed", "seeds", "name", "progress", *methods.FLOAT_FIELDS)
TOGETHER += ("fusion.rules", "fusion.mix_bias")


def together_key(config: ml_collections.ConfigDict) -> str:
    """Runs of one stream whose resolved configs have the same key can train together: equal
    but for `TOGETHER`, with the same terms of the step switched on (a weight > 0)."""
    flat = rundir.flat(rundir.jsonable(config.to_dict()))
    key = {k: v for k, v in flat.items() if k not in TOGETHER}
    key["terms on"] = [float(config.loss.kd_weight) > 0, float(config.pseudo.hard_weight) > 0]
    return json.dumps(key, sort_keys=True, default=str)


@deferred()  # a signal, also while opening or compiling, stops every run at a saved point
def run_seeds(
    stream: FeatureStream,
    text_features: np.ndarray,
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str | Path],
    *,
    overwrite: bool = False,
    mesh: Mesh | None = None,
    progress: bool = True,
    logit_scale: float | None = None,
    loss_callbacks: Sequence[Callable | None] | None = None,
) -> list[ContinualResult]:
    """Runs (or resumes) each of `configs` into its `workdirs` entry as `run_continual` would,
    `loss_callbacks[k]` being run k's `loss_callback`; those that can train together do. Raises
    what `run_continual` raises (a NaN names the run, e.g. `seed 1`)."""
    mesh = mesh if mesh is not None else sharding.make_mesh()
    callbacks = list(loss_callbacks or [None] * len(configs))
    kwargs = dict(mesh=mesh, progress=progress, logit_scale=logit_scale)
    alone = functools.partial(continual.run_continual, stream, text_features, **kwargs)
    if len(configs) == 1:  # nothing to train together with
        return [alone(configs[0], workdirs[0], overwrite=overwrite, loss_callback=callbacks[0])]
    open_run = functools.partial(
        continual.open_run, stream, text_features, overwrite=overwrite, step_callback=None, **kwargs
    )
    runs = [
        open_run(config, workdir, loss_callback=callback)
        for config, workdir, callback in zip(configs, workdirs, callbacks, strict=True)
    ]
    results = {}
    with continual.closing_checkpoints(runs):
        resumed = [continual.resume(run) for run in runs]
        for group in _groups(runs, resumed):
            found = _run_together([runs[k] for k in group], [resumed[k] for k in group])
            results.update(zip(group, found, strict=True))
    for k in range(len(runs)):
        if k not in results:
            results[k] = alone(configs[k], workdirs[k], loss_callback=callbacks[k])
    return [results[k] for k in range(len(runs))]


def _groups(runs, resumed) -> list[list[int]]:
    """Indices of runs that train together (groups of >= 2): same `together_key` and start."""
    groups: dict[tuple, list[int]] = {}
    for k, (run, (_, start)) in enumerate(zip(runs, resumed, strict=True)):
        if run.method.trains and not hasattr(run.method, "update"):
            latest = run.checkpoints.latest_step()
            point = (start, latest[1] if latest and latest[0] == start else 0)
            groups.setdefault((together_key(run.config), point), []).append(k)
    return [members for members in groups.values() if len(members) > 1]


def _run_together(runs, resumed) -> list[ContinualResult]:
    states, start = [state for state, _ in resumed], resumed[0][1]
    for run, state in zip(runs, states, strict=True):
        continual.write_results(run, state)
    for task in range(start, runs[0].stream.split.num_tasks):
        if signum := requested():
            raise Interrupted(signum, f"before task {task} (earlier ones saved)")
        states = _run_task_together(runs, task, states)
    return [continual.result_of(run, state) for run, state in zip(runs, states, strict=True)]


@functools.lru_cache(maxsize=8)
def _stack_fn(mesh: Mesh):
    def stack(trees):
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)

    return jax.jit(stack, out_shardings=sharding.replicated(mesh))


@functools.lru_cache(maxsize=8)
def _take_fn(mesh: Mesh):
    return jax.jit(
        lambda tree, k: jax.tree.map(lambda x: x[k], tree), out_shardings=sharding.replicated(mesh)
    )


def _run_task_together(runs, task: int, states: list) -> list:
    """`continual._run_task` for every run, their training as one vmapped program."""
    mesh, first = runs[0].mesh, runs[0]
    started = time.perf_counter()
    begun = continual.start_task(first, task, states[0])  # the statistics, computed once
    shared = [continual.start_task(run, task, s, shared=begun[0])
              for run, s in zip(runs[1:], states[1:], strict=True)]  # fmt: skip
    states, views = zip(begun, *shared, strict=True)
    trained = [
        continual.start_state(run, task, s.params) for run, s in zip(runs, states, strict=True)
    ]
    stack, take = _stack_fn(mesh), _take_fn(mesh)
    teachers, floats = stack([(view.inputs.teacher, view.inputs.floats) for view in views])
    # What tells each run apart from the others (e.g. `seed 1, kd_weight 0.5`).
    flats = [rundir.flat(rundir.jsonable(run.config.to_dict())) for run in runs]
    keys = [k for k in flats[0] if k != "seeds" and len({repr(f.get(k)) for f in flats}) > 1]
    labels = tuple(", ".join(f"{k.rsplit('.', 1)[-1]} {f.get(k)}" for k in keys) for f in flats)
    view = views[0]._replace(
        key=stack([view.key for view in views]),
        inputs=views[0].inputs._replace(teacher=teachers, floats=floats),
        members=labels,
    )
    savers = [continual.step_saver(run, task) for run in runs]
    reports = [continual.loss_report(run, task) for run in runs]

    def save_step(step: int, state) -> None:
        for k, save in enumerate(savers):
            save(step, take(state, k))

    def report(task, steps, losses, lrs) -> None:
        for k, each in enumerate(reports):
            if each is not None:
                each(task, steps, losses[k], lrs[k])

    state, info = train.train_task(
        first.method, first.config, view, stack([state for state, _ in trained]), mesh,
        start_step=trained[0][1], save_step=save_step,
        loss_callback=report if any(reports) else None, progress=first.progress,
    )  # fmt: skip
    seconds = (time.perf_counter() - started) / len(runs)  # the runs share the time
    return [
        continual.finish_task(run, states[k], views[k]._replace(members=(labels[k],)),
                              take(state.params, k), {**info, "loss": info["loss"][k]}, seconds)
        for k, run in enumerate(runs)
    ]  # fmt: skip
