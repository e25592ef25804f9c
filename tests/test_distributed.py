"""Data-parallel placement on the mesh, and a real 2-process run (JAX's multi-process runtime
over loopback with gloo CPU collectives) that must match the single-process result."""

import sys

import jax
import numpy as np
import pytest
from processes import REPO, run_processes

from calfuse_jax import sharding
from calfuse_jax.config import method_config
from calfuse_jax.continual import run_continual
from calfuse_jax.data.synthetic import make_synthetic_stream


def shared_stream():
    # 2 tasks of 4 classes, 16-d: 40 rows per task, batch 16 -> 3 steps (the last ragged).
    return make_synthetic_stream(
        num_classes=8, dim=16, train_per_class=10, test_per_class=5, initial=4, increment=4, seed=7
    )


def shared_config():
    c = method_config()
    c.train.update(epochs=2, milestones=(1,), batch_size=16, lr=1e-2)
    c.pseudo.hard_threshold = 0.6
    return c


def test_padded_size():
    mesh = sharding.make_mesh()  # 4 fake devices
    assert [sharding.padded_size(n, mesh) for n in (1, 4, 5, 128, 130)] == [4, 4, 8, 128, 132]


def test_shard_batch_splits_rows_over_devices():
    mesh = sharding.make_mesh()
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    placed = sharding.shard_batch({"x": x}, mesh)["x"]
    assert placed.sharding == sharding.data_sharding(mesh)
    # Each device holds its own 2 rows, in order: the data is split, not replicated.
    for shard in placed.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
        assert shard.data.shape == (2, 2)
    with pytest.raises(ValueError, match="does not split over 4 devices"):
        sharding.shard_batch(np.zeros((6, 2)), mesh)
    replicated = sharding.replicate({"w": x}, mesh)["w"]
    assert all(s.data.shape == (8, 2) for s in replicated.addressable_shards)
    np.testing.assert_array_equal(sharding.to_host(replicated), x)


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "out.npz"
    worker = [sys.executable, str(REPO / "tests" / "distributed_worker.py")]
    run_processes(lambda pid, port: [*worker, str(pid), "2", str(port), str(tmp_path / "multi"),
                                     str(out)])  # fmt: skip
    multi = np.load(out)
    assert int(multi["devices"]) == 2  # one global mesh over both processes
    # Both processes wrote into one workdir: one set of task checkpoints, one metrics file.
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints" / "tasks").iterdir()) == [
        "0",
        "1",
    ]
    stream, text = shared_stream()
    mesh = sharding.make_mesh(jax.devices()[:2])
    single = run_continual(stream, text, shared_config(), tmp_path / "single", mesh=mesh,
                           progress=False)  # fmt: skip
    # Same global batches, same RNG; only the gradient all-reduce runs over gloo instead of
    # in-process, so the parameters agree to float32 round-off.
    for i, leaf in enumerate(jax.tree.leaves(single.params)):
        np.testing.assert_allclose(multi[f"param_{i}"], leaf, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(multi["accuracy"], single.accuracy_matrix, atol=1e-6)
