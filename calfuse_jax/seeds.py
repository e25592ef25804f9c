"""Several seeds of one run trained together: one vmapped program over a leading seed axis.

Seeds of one configuration share the stream, the class statistics and every shape; only their
head, its optimiser state and their keys differ. `run_seeds` keeps one `run_continual` run folder
per seed (same files, checkpoints and resume rules), but trains each task of all seeds in the same
epoch programs (`train.epoch_fn(..., seeds=True)`), so on an accelerator three seeds cost little
more than one. The results equal the sequential runs within float error (the vmapped matmuls may
sum in another order). Seeds that would resume at different points, and methods that do not
train or set a closed-form state, run one after another instead.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from calfuse_jax import continual, sharding, train
from calfuse_jax.data.stream import FeatureStream
from calfuse_jax.interrupt import Interrupted, deferred, requested
from calfuse_jax.metrics import ContinualResult

logger = logging.getLogger("calfuse_jax")

NOT_COMPARED = ("seed", "seeds", "progress")  # what may differ between the seeds run together


@deferred()  # a signal, also while opening or compiling, stops every seed at a saved point
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
    """Runs (or resumes) `configs` — one configuration but for its `seed` — into `workdirs`,
    one folder each, as `run_continual(stream, text_features, configs[k], workdirs[k], ...)`
    would one after another; `loss_callbacks[k]` is seed k's `loss_callback`. Raises what
    `run_continual` raises (a NaN names the seed); ValueError when the configs differ in more
    than the seed."""
    _check_same_but_seed(configs)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    callbacks = list(loss_callbacks or [None] * len(configs))
    hooks = dict(progress=progress, step_callback=None)
    runs = [
        continual._open_run(
            stream,
            text_features,
            config,
            workdir,
            overwrite,
            mesh,
            logit_scale,
            loss_callback=callback,
            **hooks,
        )  # fmt: skip
        for config, workdir, callback in zip(configs, workdirs, callbacks, strict=True)
    ]
    try:
        resumed = [continual._resume(run) for run in runs]
        if _together(runs, resumed):
            return _run_together(runs, resumed)
    except continual.NonFiniteLossError as error:
        logger.error("%s", error)
        raise
    finally:
        for run in runs:
            run.checkpoints.close()
    kwargs = dict(mesh=mesh, progress=progress, logit_scale=logit_scale)  # one after another
    return [
        continual.run_continual(
            stream, text_features, config, workdir, loss_callback=callback, **kwargs
        )  # fmt: skip
        for config, workdir, callback in zip(configs, workdirs, callbacks, strict=True)
    ]


def _check_same_but_seed(configs: Sequence[ml_collections.ConfigDict]) -> None:
    def rest(config):
        return {k: v for k, v in config.to_dict().items() if k not in NOT_COMPARED}

    if any(rest(config) != rest(configs[0]) for config in configs):
        raise ValueError("run_seeds takes configs that differ only in their seed")


def _together(runs, resumed) -> bool:
    """Whether the seeds can train together: a method that trains (without a closed-form
    update) and every seed resuming at the same task and step."""
    method = runs[0].method
    if not method.trains or hasattr(method, "update") or len(runs) < 2:
        return False
    points = set()
    for run, (_, start) in zip(runs, resumed, strict=True):
        latest = run.checkpoints.latest_step()
        points.add((start, latest[1] if latest and latest[0] == start else 0))
    return len(points) == 1


def _run_together(runs, resumed) -> list[ContinualResult]:
    states, start = [state for state, _ in resumed], resumed[0][1]
    if sharding.is_primary():
        for run, state in zip(runs, states, strict=True):
            continual.rundir.write_results(run.workdir, list(state.rows), state.accuracy)
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
    """`continual._run_task` for every seed, their training as one vmapped program."""
    mesh, first = runs[0].mesh, runs[0]
    started = time.perf_counter()
    states, views = zip(
        *(continual._start_task(run, task, s) for run, s in zip(runs, states, strict=True)),
        strict=True,
    )
    trained = [
        continual._start_state(run, task, s.params) for run, s in zip(runs, states, strict=True)
    ]
    stack, take = _stack_fn(mesh), _take_fn(mesh)
    teachers = stack([view.inputs.teacher for view in views])
    view = views[0]._replace(
        key=stack([view.key for view in views]),
        inputs=views[0].inputs._replace(teacher=teachers),
        seeds=tuple(int(run.config.seed) for run in runs),
    )
    savers = [continual.step_saver(run, task) for run in runs]
    reports = [continual.loss_report(run, task) for run in runs]

    def save_step(step: int, state) -> None:
        for k, save in enumerate(savers):
            save(step, take(state, k))

    def report(task, steps, losses, lrs) -> None:
        for k, each in enumerate(reports):
            if each is not None:
                each(task, steps, losses[k], lrs)

    state, info = train.train_task(
        first.method, first.config, view, stack([state for state, _ in trained]), mesh,
        start_step=trained[0][1], save_step=save_step,
        loss_callback=report if any(reports) else None, progress=first.progress,
    )  # fmt: skip
    seconds = (time.perf_counter() - started) / len(runs)  # the seeds share the time
    return [
        continual.finish_task(run, states[k], views[k]._replace(seeds=view.seeds),
                              take(state.params, k), {**info, "loss": info["loss"][k]}, seconds)
        for k, run in enumerate(runs)
    ]  # fmt: skip
