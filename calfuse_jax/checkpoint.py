"""Orbax checkpoints of a continual run: one per finished task, plus the latest mid-task step.

Layout under `<workdir>/checkpoints/`:

- `tasks/<t>/`: written after task t is trained, fused and evaluated. `state` holds every array
  the next task needs (head + gate params, class statistics, accuracy matrix, RNG key); `meta` is
  JSON (task index, config, fingerprint, the metrics rows so far).
- `steps/<t * STEP_STRIDE + s>/`: the state after step s of task t (params + optimiser state),
  kept only for the newest step; a run killed mid-task resumes from it.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
half-written checkpoint is never listed. Saving is collective: under `jax.distributed` every
process calls `save`; Orbax coordinates who writes what. Restores go through an abstract target
(shapes, dtypes and shardings), so a run saved on 4 devices restores on 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

STEP_STRIDE = 10_000_000  # step checkpoint id = task * STEP_STRIDE + step


class RunCheckpoints:
    """The task and step checkpoint managers of one workdir."""

    def __init__(self, directory: str | Path):
        directory = Path(directory).absolute()
        self.directory = directory
        # Synchronous saves: a checkpoint is complete when `save` returns, which keeps the order
        # "checkpoint, then metrics files" simple and lets the next step donate the saved arrays.
        self._tasks = ocp.CheckpointManager(
            directory / "tasks",
            options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
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

    # Finished tasks.
    def finished_tasks(self) -> list[int]:
        """Indices of the tasks with a complete checkpoint, ascending."""
        return sorted(self._tasks.all_steps())

    def save_task(self, task: int, state: Any, meta: dict) -> None:
        """Saves the end-of-task `state` pytree and JSON `meta` of task `task`."""
        self._tasks.save(
            task,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._tasks.wait_until_finished()

    def task_meta(self, task: int) -> dict:
        """The JSON part of task `task`'s checkpoint (cheap: no arrays read)."""
        restored = self._tasks.restore(task, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore_task(self, task: int, abstract_state: Any) -> Any:
        """The state of task `task`, shaped and placed like `abstract_state` (ShapeDtypeStructs)."""
        restored = self._tasks.restore(
            task, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"]

    # Mid-task steps.
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
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
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
        return restored["state"], dict(restored["meta"])


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
