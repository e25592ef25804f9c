"""Orbax task/step checkpoints and the workdir fingerprint."""

import shutil

import jax
import numpy as np
import pytest

from calfuse_jax import checkpoint, sharding


def _state(seed):
    rng = np.random.default_rng(seed)
    accuracy = np.full((3, 3), np.nan, np.float32)
    accuracy[0, 0] = 71.25
    return {
        "params": {"adapter": {"kernel": rng.standard_normal((4, 4)).astype(np.float32)}},
        "accuracy": accuracy,  # NaN above the diagonal must survive the round trip
        "key": np.array([0, seed], np.uint32),
    }


def test_task_checkpoint_round_trip_across_meshes(tmp_path):
    four = sharding.make_mesh()  # the suite's 4 fake CPU devices
    one = sharding.make_mesh(jax.devices()[:1])
    checkpoints = checkpoint.RunCheckpoints(tmp_path / "checkpoints")
    saved = _state(1)
    checkpoints.save_task(0, sharding.replicate(saved, four), {"task": 0, "rows": [{"a": 1}]})
    checkpoints.save_task(1, sharding.replicate(_state(2), four), {"task": 1, "rows": []})
    checkpoints.close()
    reopened = checkpoint.RunCheckpoints(tmp_path / "checkpoints")
    assert reopened.finished_tasks() == [0, 1]
    assert reopened.task_meta(0) == {"task": 0, "rows": [{"a": 1}]}
    abstract = checkpoint.abstract_like(saved, sharding.replicated(one))
    restored = reopened.restore_task(0, abstract)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        assert a.sharding == sharding.replicated(one)  # restored onto the new mesh
        np.testing.assert_array_equal(np.asarray(a), b)  # equal, NaN included
    reopened.close()


def test_step_checkpoints_keep_only_the_newest(tmp_path):
    mesh = sharding.make_mesh()
    checkpoints = checkpoint.RunCheckpoints(tmp_path)
    assert checkpoints.latest_step() is None
    checkpoints.save_step(1, 3, sharding.replicate(_state(3), mesh), {"step": 3})
    checkpoints.save_step(1, 6, sharding.replicate(_state(6), mesh), {"step": 6})
    assert checkpoints.latest_step() == (1, 6)
    assert [p.name for p in (tmp_path / "steps").iterdir() if p.name.isdigit()] == ["10000006"]
    abstract = checkpoint.abstract_like(_state(0), sharding.replicated(mesh))
    state, meta = checkpoints.restore_step(1, 6, abstract)
    assert meta == {"step": 6}
    np.testing.assert_array_equal(np.asarray(state["key"]), [0, 6])
    with pytest.raises(ValueError, match="step must be in"):
        checkpoints.save_step(1, 0, _state(0), {})
    checkpoints.close()


def test_a_checkpoint_of_another_layout_is_refused(tmp_path, monkeypatch):
    mesh = sharding.make_mesh()
    checkpoints = checkpoint.RunCheckpoints(tmp_path)
    monkeypatch.setattr(checkpoint, "LAYOUT", 1)  # what the previous version wrote
    checkpoints.save_task(0, sharding.replicate(_state(1), mesh), {"task": 0})
    checkpoints.save_step(1, 3, sharding.replicate(_state(3), mesh), {"step": 3})
    monkeypatch.undo()
    abstract = checkpoint.abstract_like(_state(0), sharding.replicated(mesh))
    with pytest.raises(checkpoint.TaskCheckpointError, match=r"tasks/0 has layout 1.*--overwrite"):
        checkpoints.task_meta(0)
    with pytest.raises(checkpoint.TaskCheckpointError, match="steps/10000003 has layout 1"):
        checkpoints.restore_step(1, 3, abstract)
    checkpoints.close()


def test_half_written_checkpoint_is_not_a_finished_task(tmp_path):
    mesh = sharding.make_mesh()
    checkpoints = checkpoint.RunCheckpoints(tmp_path)
    checkpoints.save_task(0, sharding.replicate(_state(1), mesh), {"task": 0})
    checkpoints.close()
    # What a crash during Orbax's write leaves: a temporary folder, renamed only when complete.
    (tmp_path / "tasks" / "1.orbax-checkpoint-tmp-1234567").mkdir()
    assert checkpoint.RunCheckpoints(tmp_path).finished_tasks() == [0]


def test_class_stats_are_rebuilt_from_each_tasks_own_classes(tmp_path):
    # Task 0 adds 2 classes, task 1 adds 3 (3-d): each checkpoint holds its own rows only, and
    # the restore puts them in place in arrays of all classes, on another mesh than the one that
    # saved.
    four = sharding.make_mesh()
    one = sharding.replicated(sharding.make_mesh(jax.devices()[:1]))
    rng = np.random.default_rng(0)
    bounds = [0, 2, 5]
    means = rng.standard_normal((5, 3)).astype(np.float32)
    chols = rng.standard_normal((5, 3, 3)).astype(np.float32)
    checkpoints = checkpoint.RunCheckpoints(tmp_path)
    for task in range(2):
        new = {"means": means[bounds[task] : bounds[task + 1]]}
        new["chols"] = chols[bounds[task] : bounds[task + 1]]
        state, new = sharding.replicate((_state(task), new), four)
        checkpoints.save_task(task, state, {"task": task}, new_stats=new)
    checkpoints.save_task(2, sharding.replicate(_state(2), four), {"task": 2})  # no statistics
    checkpoints.close()
    reopened = checkpoint.RunCheckpoints(tmp_path)
    assert reopened.task_shapes(1) == {"means": (3, 3), "chols": (3, 3, 3)}
    assert reopened.task_shapes(2) is None
    rebuilt = reopened.class_stats(1, bounds, 3, one)
    np.testing.assert_array_equal(rebuilt["means"], means)
    np.testing.assert_array_equal(rebuilt["chols"], chols)
    first = reopened.class_stats(0, bounds, 3, one)
    np.testing.assert_array_equal(first["chols"][:2], chols[:2])
    assert not first["means"][2:].any() and not first["chols"][2:].any()  # zero padding
    with pytest.raises(checkpoint.TaskCheckpointError, match="task checkpoint 2 .* holds no class"):
        reopened.class_stats(2, [0, 2, 5, 6], 3, one)
    with pytest.raises(checkpoint.TaskCheckpointError, match=r"task checkpoint 0 .* \(2, 3\)"):
        reopened.class_stats(1, [0, 3, 5], 3, one)  # another split
    reopened.close()
    shutil.rmtree(tmp_path / "tasks" / "1" / "stats" / "d")  # damaged after it was committed
    damaged = checkpoint.RunCheckpoints(tmp_path)
    with pytest.raises(checkpoint.TaskCheckpointError, match="task checkpoint 1 .* unreadable"):
        damaged.class_stats(1, bounds, 3, one)
    damaged.close()
