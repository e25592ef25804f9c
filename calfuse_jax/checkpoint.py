"""Orbax checkpoints of a continual run under `<workdir>/checkpoints/`: `tasks/<t>/` after task t
(`state`: head params, accuracy matrix; `stats`: its own classes' means [n_t, D] and Cholesky
factors [n_t, D, D]; `meta`: JSON) and `steps/<t * STEP_STRIDE + s>/`, the newest mid-task step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from calfuse_jax import sharding

STEP_STRIDE = 10_000_000  # step checkpoint id = task * STEP_STRIDE + step
LAYOUT = 3  # another layout is refused with the fix, never misread


class TaskCheckpointError(ValueError):
    """A checkpoint a restore needs is missing, half-written, unreadable or of another layout."""


def _checked(meta: dict, path: Path) -> dict:
    meta = dict(meta)
    layout = meta.pop("layout", 1)
    if layout != LAYOUT:
        raise TaskCheckpointError(
            f"checkpoint {path} has layout {layout}, but this version of calfuse_jax reads layout "
            f"{LAYOUT} only; start the run again with overwrite=True (--overwrite), which moves "
            "the old results aside, or use another workdir"
        )
    return meta


def task_meta(task: int, fingerprint: str, config: dict, rows: Sequence[dict]) -> dict:
    """The JSON metadata of a task checkpoint (what a resume checks and restores)."""
    meta = {"task": task, "fingerprint": fingerprint, "config": config, "rows": list(rows)}
    return json.loads(json.dumps(meta, default=str))


class RunCheckpoints:
    """The task and step checkpoint managers of one workdir."""

    def __init__(self, directory: str | Path):
        self.directory = directory = Path(directory).absolute()
        for folder in (directory, directory / "tasks", directory / "steps"):
            if folder.exists() and not folder.is_dir():  # Orbax would fail at the first save
                raise TaskCheckpointError(
                    f"{folder} is a file where the run keeps its checkpoints; move it away, or "
                    "pass overwrite=True (--overwrite) to move the old results aside"
                )
        # Synchronous saves (the next step donates the arrays); named handlers read shapes alone.
        sync = {"create": True, "enable_async_checkpointing": False}
        standard = ocp.StandardCheckpointHandler
        handlers = {"state": standard(), "stats": standard(), "meta": ocp.JsonCheckpointHandler()}
        options = ocp.CheckpointManagerOptions(**sync)
        self._tasks = ocp.CheckpointManager(
            directory / "tasks", options=options, item_handlers=handlers
        )
        options = ocp.CheckpointManagerOptions(max_to_keep=1, **sync)
        self._steps = ocp.CheckpointManager(directory / "steps", options=options)

    def close(self) -> None:
        self._tasks.close()
        self._steps.close()

    def finished_tasks(self) -> list[int]:
        return sorted(self._tasks.all_steps())

    def task_path(self, task: int) -> Path:
        return self.directory / "tasks" / str(task)

    def save_task(self, task: int, state: Any, meta: dict, new_stats: Any = None) -> None:
        """Saves task `task`'s `state`, `meta` and `new_stats` (its own classes' means, chols)."""
        stats = {} if new_stats is None else {"stats": ocp.args.StandardSave(new_stats)}
        _save(self._tasks, task, state, meta, **stats)

    def task_shapes(self, task: int, item: str = "stats") -> dict[str, tuple[int, ...]] | None:
        """Shapes of `item` ("state" or "stats") by "/"-joined path (no arrays read), or None."""
        metadata = self._tasks.item_metadata(task).get(item)
        if metadata is None:
            return None
        leaves = jax.tree_util.tree_flatten_with_path(dict(metadata.tree))[0]
        return {
            "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in leaves
        }

    def task_meta(self, task: int) -> dict:
        """The JSON part of task `task`'s checkpoint."""
        restored = self._restore(task, meta=ocp.args.JsonRestore())
        return _checked(restored["meta"], self.task_path(task))

    def restore_task(self, task: int, abstract_state: Any) -> Any:
        """The state of task `task`, shaped and placed like `abstract_state` (ShapeDtypeStructs)."""
        return self._restore(task, state=ocp.args.StandardRestore(abstract_state))["state"]

    def restore_head(self, task: int, init: Callable, num_tasks: int, placement) -> dict:
        """`{"params", "accuracy" [T, T]}` of task `task`, the params shaped like `init(key)`."""
        accuracy = jax.ShapeDtypeStruct((num_tasks, num_tasks), np.float32)
        params = jax.eval_shape(init, jax.random.PRNGKey(0))
        abstract = {"params": params, "accuracy": accuracy}
        return self.restore_task(task, abstract_like(abstract, placement))

    def _restore(self, task: int, **items) -> Any:
        try:
            return self._tasks.restore(task, args=ocp.args.Composite(**items))
        except Exception as error:  # Orbax/TensorStore report damaged files in many types
            problem = f"is unreadable ({' '.join(str(error).split())[:300]})"  # one line
            raise _stats_error(self, task, task, problem) from error

    def latest_step(self) -> tuple[int, int] | None:
        """(task, step) of the newest step checkpoint, or None."""
        latest = self._steps.latest_step()
        return None if latest is None else divmod(int(latest), STEP_STRIDE)

    def save_step(self, task: int, step: int, state: Any, meta: dict) -> None:
        """Saves the mid-task state after `step` steps of task `task`."""
        if not 0 < step < STEP_STRIDE:
            raise ValueError(f"step must be in (0, {STEP_STRIDE}), got {step}")
        _save(self._steps, task * STEP_STRIDE + step, state, meta)

    def restore_step(self, task: int, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) of the step checkpoint after `step` steps of task `task`."""
        index = task * STEP_STRIDE + step
        state = ocp.args.StandardRestore(abstract_state)
        restored = self._steps.restore(
            index, args=ocp.args.Composite(state=state, meta=ocp.args.JsonRestore())
        )
        return restored["state"], _checked(restored["meta"], self.directory / "steps" / str(index))

    def class_stats(self, task: int, bounds: Sequence[int], dim: int, placement) -> dict:
        """NumPy `{"means": [C, D], "chols": [C, D, D]}` (C = bounds[-1], zero past classes seen
        after `task`) from the checkpoints of tasks 0..task, restored through `placement`."""
        finished, classes = set(self.finished_tasks()), int(bounds[-1])
        out = {"means": np.zeros((classes, dim), np.float32)}
        out["chols"] = np.zeros((classes, dim, dim), np.float32)
        for k in range(task + 1):
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            expected = {"means": (hi - lo, dim), "chols": (hi - lo, dim, dim)}
            if k not in finished:
                raise _stats_error(self, k, task, "is missing")
            try:
                shapes = self.task_shapes(k, "stats")
                if shapes != expected:
                    problem = f"holds {shapes}" if shapes else "holds no class statistics"
                    raise _stats_error(self, k, task, f"{problem}, not {expected}")
                abstract = {
                    name: jax.ShapeDtypeStruct(shape, np.float32, sharding=placement)
                    for name, shape in expected.items()
                }
                args = ocp.args.Composite(stats=ocp.args.StandardRestore(abstract))
                part = sharding.to_host(self._tasks.restore(k, args=args)["stats"])
            except TaskCheckpointError:
                raise
            except Exception as error:  # Orbax/TensorStore report damaged files in many types
                problem = f"is unreadable ({str(error)[:300]})"
                raise _stats_error(self, k, task, problem) from error
            out["means"][lo:hi], out["chols"][lo:hi] = part["means"], part["chols"]
        return out


def _save(manager: ocp.CheckpointManager, index: int, state: Any, meta: dict, **items) -> None:
    meta = ocp.args.JsonSave({**meta, "layout": LAYOUT})
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=meta, **items)
    manager.save(index, args=args, force=True)
    manager.wait_until_finished()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _stats_error(checkpoints: RunCheckpoints, k: int, task: int, problem: str):
    path = checkpoints.task_path(k)
    partial = sorted(path.parent.glob(f"{k}.orbax-checkpoint-tmp-*"))
    if partial:
        problem += f" (only a half-written {partial[0].name} is there)"
    resume = f"delete {path.parent}/<t> for every t >= {k} to resume after task {k - 1}, or "
    fixes = (resume if k > 0 else "") + "pass overwrite=True (--overwrite) to start the run again"
    return TaskCheckpointError(
        f"task checkpoint {k} ({path}) {problem}; resuming after task {task} reads task "
        f"checkpoints 0..{task} (each holds its own classes' statistics): {fixes}"
    )
