"""Orbax checkpoints of a continual run: one per finished task, plus the latest mid-task step.

Layout under `<workdir>/checkpoints/`:

- `tasks/<t>/`: written after task t is trained, fused and evaluated. `state` holds the head
  params and the accuracy matrix; `stats` the statistics of the classes task t added only (means
  [n_t, D], Cholesky factors [n_t, D, D]); `meta` is JSON (task index, config, fingerprint, the
  metrics rows so far). Restoring task t reads `stats` of tasks 0..t (`class_stats`), so every
  earlier task checkpoint must still be there; storing all seen classes in every checkpoint
  instead would write sum_t C_t classes (1 MiB each at 512-d).
- `steps/<t * STEP_STRIDE + s>/`: params + optimiser state after step s of task t, kept for the
  newest step only; a run killed mid-task resumes from it.

Every `meta` carries `layout` (`LAYOUT`): a checkpoint of another layout is refused with the fix,
never misread.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
half-written checkpoint is never listed. Saving is collective: under `jax.distributed` every
process calls `save`; Orbax coordinates who writes what. Restores go through an abstract target
(shapes, dtypes and shardings), so a run saved on 4 devices restores on 1. Which run a workdir
holds, and its other files, are `calfuse_jax.rundir`'s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from calfuse_jax import sharding

STEP_STRIDE = 10_000_000  # step checkpoint id = task * STEP_STRIDE + step
LAYOUT = 3  # 1: the state also held `curves` and `key` (no `layout` field in the meta); 2: the
# host-driven loop (NumPy batch orders, step checkpoints inside an epoch)


class TaskCheckpointError(ValueError):
    """A checkpoint that a restore needs is missing, half-written, unreadable or of another
    layout (a ValueError, like rundir.ConfigMismatchError: the user fixes it from the message)."""


def _checked(meta: dict, path: Path) -> dict:
    """`meta` without its `layout` field; TaskCheckpointError when the layout is not `LAYOUT`."""
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
    """The JSON metadata of a task checkpoint: the run's fingerprint and config, and the metrics
    rows of the tasks so far (what a resume checks and restores)."""
    meta = {"task": task, "fingerprint": fingerprint, "config": config, "rows": list(rows)}
    return json.loads(json.dumps(meta, default=str))


class RunCheckpoints:
    """The task and step checkpoint managers of one workdir."""

    def __init__(self, directory: str | Path):
        directory = Path(directory).absolute()
        self.directory = directory
        for folder in (directory, directory / "tasks", directory / "steps"):
            if folder.exists() and not folder.is_dir():  # Orbax would fail at the first save
                raise TaskCheckpointError(
                    f"{folder} is a file where the run keeps its checkpoints; move it away, or "
                    "pass overwrite=True (--overwrite) to move the old results aside"
                )
        # Synchronous saves: a checkpoint is complete when `save` returns, which keeps the order
        # "checkpoint, then metrics files" simple and lets the next step donate the saved arrays.
        # Named handlers let a fresh manager read an item's metadata (shapes) without its arrays.
        self._tasks = ocp.CheckpointManager(
            directory / "tasks",
            options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "stats": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._steps = ocp.CheckpointManager(
            directory / "steps",
            options=ocp.CheckpointManagerOptions(
                create=True, max_to_keep=1, enable_async_checkpointing=False
            ),
        )

    def close(self) -> None:
        self._tasks.close()
        self._steps.close()

    def finished_tasks(self) -> list[int]:
        """Indices of the tasks with a complete checkpoint, ascending."""
        return sorted(self._tasks.all_steps())

    def task_path(self, task: int) -> Path:
        """The folder of task `task`'s checkpoint (whether or not it exists)."""
        return self.directory / "tasks" / str(task)

    def save_task(self, task: int, state: Any, meta: dict, new_stats: Any = None) -> None:
        """Saves the end-of-task `state` pytree and JSON `meta` of task `task`, plus `new_stats`
        (`{"means": [n_t, D], "chols": [n_t, D, D]}` of the task's own classes) when given."""
        items = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave({**meta, "layout": LAYOUT}),
        }
        if new_stats is not None:
            items["stats"] = ocp.args.StandardSave(new_stats)
        self._tasks.save(task, args=ocp.args.Composite(**items), force=True)
        self._tasks.wait_until_finished()

    def task_shapes(self, task: int, item: str = "stats") -> dict[str, tuple[int, ...]] | None:
        """Shapes of `item` ("state" or "stats") in task `task`'s checkpoint by "/"-joined path,
        from Orbax's metadata (no arrays read); None when it has no such item."""
        metadata = self._tasks.item_metadata(task).get(item)
        if metadata is None:
            return None
        leaves = jax.tree_util.tree_flatten_with_path(dict(metadata.tree))[0]
        return {
            "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in leaves
        }

    def task_meta(self, task: int) -> dict:
        """The JSON part of task `task`'s checkpoint (cheap: no arrays read)."""
        restored = self._restore(task, meta=ocp.args.JsonRestore())
        return _checked(restored["meta"], self.task_path(task))

    def restore_task(self, task: int, abstract_state: Any) -> Any:
        """The state of task `task`, shaped and placed like `abstract_state` (ShapeDtypeStructs)."""
        return self._restore(task, state=ocp.args.StandardRestore(abstract_state))["state"]

    def _restore(self, task: int, **items) -> Any:
        """`items` of task `task`'s checkpoint; TaskCheckpointError naming it when unreadable."""
        try:
            return self._tasks.restore(task, args=ocp.args.Composite(**items))
        except Exception as error:  # Orbax/TensorStore report damaged files in many types
            problem = f"is unreadable ({' '.join(str(error).split())[:300]})"  # one line
            raise _stats_error(self, task, task, problem) from error

    def latest_step(self) -> tuple[int, int] | None:
        """(task, step) of the newest step checkpoint, or None."""
        latest = self._steps.latest_step()
        if latest is None:
            return None
        return divmod(int(latest), STEP_STRIDE)

    def save_step(self, task: int, step: int, state: Any, meta: dict) -> None:
        """Saves the mid-task state after `step` steps of task `task`."""
        if not 0 < step < STEP_STRIDE:
            raise ValueError(f"step must be in (0, {STEP_STRIDE}), got {step}")
        self._steps.save(
            task * STEP_STRIDE + step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({**meta, "layout": LAYOUT}),
            ),
            force=True,
        )
        self._steps.wait_until_finished()

    def restore_step(self, task: int, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) of the step checkpoint after `step` steps of task `task`."""
        restored = self._steps.restore(
            task * STEP_STRIDE + step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        path = self.directory / "steps" / str(task * STEP_STRIDE + step)
        return restored["state"], _checked(restored["meta"], path)

    def class_stats(self, task: int, bounds: Sequence[int], dim: int, placement) -> dict:
        """The statistics of every class seen after `task`, from the checkpoints of tasks
        0..task (task k's holds positions bounds[k]:bounds[k+1]).

        Args:
          bounds: [T + 1] task boundaries in positions (`TaskSplit.bounds`); dim: feature width D.
          placement: the sharding to restore through (replicated over the run's mesh).
        Returns:
          NumPy `{"means": [C, D], "chols": [C, D, D]}` for all C = bounds[-1] classes, zero past
          bounds[task + 1] (bit for bit what the uninterrupted run carried).
        Raises:
          TaskCheckpointError naming the first task checkpoint that is missing, half-written,
          without statistics or unreadable.
        """
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
                abstract = abstract_like(
                    {
                        name: jax.ShapeDtypeStruct(shape, np.float32)
                        for name, shape in expected.items()
                    },
                    placement,
                )
                args = ocp.args.Composite(stats=ocp.args.StandardRestore(abstract))
                part = sharding.to_host(self._tasks.restore(k, args=args)["stats"])
            except TaskCheckpointError:
                raise
            except Exception as error:  # Orbax/TensorStore report damaged files in many types
                problem = f"is unreadable ({str(error)[:300]})"
                raise _stats_error(self, k, task, problem) from error
            out["means"][lo:hi], out["chols"][lo:hi] = part["means"], part["chols"]
        return out


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _stats_error(checkpoints: RunCheckpoints, k: int, task: int, problem: str):
    path = checkpoints.task_path(k)
    partial = sorted(path.parent.glob(f"{k}.orbax-checkpoint-tmp-*"))
    if partial:
        problem += f" (only a half-written {partial[0].name} is there)"
    fixes = "pass overwrite=True (--overwrite) to start the run again"
    if k > 0:
        fixes = (
            f"delete {path.parent}/<t> for every t >= {k} to resume after task {k - 1}, or {fixes}"
        )
    return TaskCheckpointError(
        f"task checkpoint {k} ({path}) {problem}; resuming after task {task} reads task "
        f"checkpoints 0..{task} (each holds its own classes' statistics): {fixes}"
    )
