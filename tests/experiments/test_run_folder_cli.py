"""The run folder through both commands: resume-safe fields resume, a diverging run exits 3 from
`run` and `ablate` alike, a second process on a busy workdir is refused at once, and damaged
derived files are rebuilt from the checkpoints."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import calfuse_jax.continual
from calfuse_jax import rundir
from experiments import ablate, run

REPO = Path(__file__).resolve().parents[2]


def smoke(workdir, *extra):
    # synthetic:smoke: generated features (no encoder), 4 tiny tasks: seconds on a CPU.
    return ["--config", "synthetic:smoke", "--workdir", str(workdir), "-q", *extra]


def no_training(*args, **kwargs):
    raise AssertionError("a task was trained again on a resumed run")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("folder") / "run"
    assert run.main(smoke(workdir)) == 0
    return workdir


def test_a_resume_safe_field_resumes(finished, monkeypatch):
    monkeypatch.setattr(calfuse_jax.continual, "_run_task", no_training)
    assert run.main(smoke(finished, "--config.train.checkpoint_every_steps=5")) == 0
    assert [r["task"] for r in rundir.read_metrics(finished)] == [0, 1, 2, 3]


def test_damaged_derived_files_are_rebuilt(finished, monkeypatch):
    names = ("metrics.jsonl", rundir.FINGERPRINT_FILE, "summary.json")
    before = {name: (finished / name).read_bytes() for name in names}
    for name in names:  # torn in the middle, as a crash inside a non-atomic write would leave it
        (finished / name).write_bytes(before[name][: len(before[name]) // 2])
    monkeypatch.setattr(calfuse_jax.continual, "_run_task", no_training)
    assert run.main(smoke(finished)) == 0
    for name in names:
        assert (finished / name).read_bytes() == before[name], name


@pytest.mark.parametrize("command", ["run", "ablate"])
def test_a_diverging_run_exits_3_with_one_paragraph(command, tmp_path, capsys):
    args = smoke(tmp_path / "w", "--config.train.lr=1e30")
    if command == "run":
        code = run.main(args)
    else:
        code = ablate.main([*args, "--grid", "pseudo.beta=2", "--no-compile-cache"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "error: the training loss became" in err and "Traceback" not in err


def test_a_second_process_on_a_busy_workdir_is_refused_at_once(finished, tmp_path, monkeypatch):
    workdir = tmp_path / "busy"
    real_run = calfuse_jax.continual.run_continual
    second = {}

    def run_while_a_second_command_starts(*args, **kwargs):
        listing = sorted((p.name, p.stat().st_mtime_ns) for p in workdir.rglob("*"))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "experiments.run", *smoke(workdir)], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        second.update(code=proc.returncode, err=proc.stderr, seconds=time.monotonic() - started)
        second["untouched"] = listing == sorted(
            (p.name, p.stat().st_mtime_ns) for p in workdir.rglob("*")
        )
        return real_run(*args, **kwargs)

    monkeypatch.setattr(calfuse_jax.continual, "run_continual", run_while_a_second_command_starts)
    assert run.main(smoke(workdir)) == 0
    assert second["code"] == 2, second["err"]
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in second["err"]
    assert "Traceback" not in second["err"] and second["seconds"] < 60
    assert second["untouched"]  # the refused command wrote nothing
    # The first run finished as if alone: the numbers of the same run in another folder.
    assert (workdir / "summary.json").read_text() == (finished / "summary.json").read_text()
