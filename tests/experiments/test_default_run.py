"""A run as a newcomer starts it: no --workdir (the default folder under ./runs), the results
and cache shared through the umask, TensorBoard curves per step, and seeds added later.

The tests share one real `demo:smoke` run (training it is the slow part) and run in file order:
the last one adds a seed to it.
"""

import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import calfuse_jax.continual
import calfuse_jax.features
from calfuse_jax import rundir
from experiments import cli, run

# demo:smoke: 10 procedural classes x 20 train images, a random tiny CLIP, batch 16, 2 epochs.
# Two tasks of 5 classes; lr 1e-3 in epoch 0 and 1e-4 from epoch 1 on (milestone 1).
ARGS = [
    "--config",
    "demo:smoke",
    "--config.cache_dir=cache",  # relative: lands next to ./runs in the test's folder
    "--config.continual.initial=5",
    "--config.continual.increment=5",
    "--config.train.milestones=1",
    "--config.progress=false",
]
STEPS_PER_TASK = 2 * math.ceil(5 * 20 / 16)  # epochs x ceil(images / batch)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """(folder the command ran in, its results folder) of one run under umask 0o022."""
    root = tmp_path_factory.mktemp("newcomer")
    old_mask = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(root)
            assert run.main(ARGS) == 0
    finally:
        os.umask(old_mask)
    folders = list((root / "runs").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("demo-smoke-calfuse-"), folders
    return root, folders[0]


def modes(folder: Path) -> dict[str, set[str]]:
    """{'files': {octal modes}, 'dirs': {...}} of everything under `folder` (itself included)."""
    found = {"files": set(), "dirs": set()}
    for path in [folder, *folder.rglob("*")]:
        found["dirs" if path.is_dir() else "files"].add(oct(path.stat().st_mode & 0o777))
    return found


def test_results_and_cache_are_readable_by_the_group_and_others(default_run):
    root, workdir = default_run
    assert (workdir / "provenance.json").is_file()
    assert list((root / "cache" / "features").rglob("manifest.json"))
    assert (root / "cache" / "models" / "random-tiny-seed0" / "model.safetensors").is_file()
    for folder in (workdir, root / "cache"):
        assert modes(folder) == {"files": {"0o644"}, "dirs": {"0o755"}}, folder


def read_events(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TFRecord event files (length, crc, Event, crc)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_has_loss_and_lr_at_every_step_across_tasks(default_run):
    _, workdir = default_run
    scalars = read_events(workdir / "tensorboard")
    total = 2 * STEPS_PER_TASK
    loss, lr = scalars["train/loss"], scalars["train/lr"]
    assert [step for step, _ in loss] == list(range(1, total + 1))  # no overlap between tasks
    assert [step for step, _ in lr] == list(range(1, total + 1))
    assert all(np.isfinite(value) for _, value in loss)
    # Each task restarts the schedule: its first epoch at 1e-3, then x0.1 after milestone 1.
    epoch = STEPS_PER_TASK // 2
    expected = ([1e-3] * epoch + [1e-4] * epoch) * 2
    assert np.allclose([value for _, value in lr], expected, rtol=1e-6)
    # The per-task scalars are still there next to the per-step ones.
    assert [step for step, _ in scalars["task/accuracy"]] == [0, 1]


def test_more_seeds_reuse_the_finished_seed_in_the_default_folder(default_run, monkeypatch):
    root, workdir = default_run
    first = {n: (workdir / n).read_bytes() for n in ("metrics.jsonl", "summary.json")}
    trained = []
    real_run_task = calfuse_jax.continual._run_task

    def counting_run_task(continual_run, task, carry):
        trained.append((int(continual_run.config.seed), task))
        return real_run_task(continual_run, task, carry)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the features are cached: the image encoder must not run")

    monkeypatch.setattr(calfuse_jax.continual, "_run_task", counting_run_task)
    monkeypatch.setattr(calfuse_jax.features, "make_image_encoder", no_encoder)
    monkeypatch.chdir(root)
    assert run.main([*ARGS, "--config.seeds=0,1"]) == 0

    assert trained == [(1, 0), (1, 1)]  # seed 1 only: seed 0 was not trained again
    assert list((root / "runs").iterdir()) == [workdir]  # the same default folder
    seed_0 = workdir / "seed_0"
    for name, content in first.items():
        assert (seed_0 / name).read_bytes() == content, name
    assert not (workdir / "metrics.jsonl").exists()  # the one-seed run moved into seed_0/
    avgs = [rundir.read_json(workdir / f"seed_{k}" / "summary.json")["avg"] for k in (0, 1)]
    summary = rundir.read_json(workdir / "summary.json")
    assert summary["seeds"] == [0, 1]
    assert summary["avg"] == pytest.approx(np.mean(avgs))
    assert summary["avg_std"] == pytest.approx(np.std(avgs, ddof=1))


@pytest.mark.parametrize(
    "parts", [("../../escaped", "calfuse"), ("/tmp/abs", ""), ("..", ""), ("a/../../b", "rapf")]
)
def test_a_default_workdir_never_leaves_runs(parts):
    workdir = cli.default_workdir(parts, ["train.epochs=3"])
    assert workdir.parent == Path("runs") and workdir.name not in ("", ".", "..")
    assert "/" not in workdir.name and not workdir.name.startswith(".")
