"""`python -m experiments.run --distributed` as 2 real JAX processes (loopback, gloo collectives):
the same numbers as one process, one results folder written once by process 0, and an
--overwrite that moves the earlier run aside exactly once."""

import sys
from pathlib import Path

import numpy as np
import pytest
from processes import run_processes

from calfuse_jax import rundir
from experiments import cli, run

TOP_LEVEL = {
    ".lock",  # the run folder's lock (rundir.lock): process 0 held it, the file stays
    "accuracy_curve.png",
    "accuracy_matrix.csv",
    "accuracy_matrix.png",
    "checkpoints",
    "config.json",
    "metrics.jsonl",
    "provenance.json",
    "run.log",
    "run_fingerprint.json",
    "summary.json",
    "tensorboard",
}


def smoke_args(workdir: Path, *extra: str) -> list[str]:
    return ["--config", "synthetic:smoke", "--workdir", str(workdir), "-q", *extra]


def run_two_processes(workdir: Path, *extra: str) -> list[str]:
    """Runs the CLI as processes 0 and 1 of one JAX run; returns their logs (both must exit 0)."""
    command = [sys.executable, "-m", "experiments.run", *smoke_args(workdir, *extra)]
    return run_processes(
        lambda pid, port: [*command, "--distributed", "--coordinator", f"127.0.0.1:{port}",
                           "--num-processes", "2", "--process-id", str(pid)],
        timeout=120,
    )  # fmt: skip


def check_written_once(workdir: Path) -> None:
    """Every results file once, none half-written, nothing appended by a second writer."""
    assert {p.name for p in workdir.iterdir() if not p.name.startswith("overwritten-")} == TOP_LEVEL
    assert not [p for p in workdir.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert [r["task"] for r in rundir.read_metrics(workdir)] == [0, 1, 2, 3]
    assert "resumed" not in rundir.read_json(workdir / "provenance.json")
    assert (workdir / "run.log").read_text().count("synthetic:smoke calfuse seed 0 ->") == 1
    tasks = workdir / "checkpoints" / "tasks"
    assert sorted(p.name for p in tasks.iterdir()) == ["0", "1", "2", "3"]


def test_two_processes_write_one_folder_equal_to_one_process(tmp_path, capsys):
    multi = tmp_path / "multi"
    logs = run_two_processes(multi)
    check_written_once(multi)
    # Process 0 alone prints the table; process 1 computed the same run silently.
    assert "results: " in logs[0] and "results: " not in logs[1]

    assert run.main(smoke_args(tmp_path / "single")) == 0
    capsys.readouterr()
    one = rundir.read_json(tmp_path / "single" / "summary.json")
    two = rundir.read_json(multi / "summary.json")
    np.testing.assert_allclose(
        np.array(two["accuracy_matrix"], float), np.array(one["accuracy_matrix"], float), atol=1e-6
    )
    assert two["avg"] == pytest.approx(one["avg"], abs=1e-6)
    assert two["last"] == pytest.approx(one["last"], abs=1e-6)
    # The provenance records the 2-device global mesh the run used.
    assert len(rundir.read_json(multi / "provenance.json")["devices"]) == 2

    # Another config with --overwrite: process 0 moves the first run aside once, after both
    # processes inspected the folder, and both then write (through process 0) the new run.
    run_two_processes(multi, "--overwrite", "--config.synthetic.data_seed=1")
    check_written_once(multi)
    (aside,) = multi.glob("overwritten-*")
    assert rundir.read_json(aside / "summary.json") == two
    assert rundir.read_json(multi / "config.json")["synthetic"]["data_seed"] == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--process-id", "0"], "--process-id only apply with --distributed"),
        (
            ["--distributed", "--num-processes", "2", "--process-id", "2"],
            "the id must be in 0..N-1",
        ),
    ],
)
def test_bad_distributed_flags_are_user_errors(tmp_path, capsys, flags, message):
    assert run.main(smoke_args(tmp_path / "w", *flags)) == cli.EXIT_USER_ERROR
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit):
        run.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--distributed", "--coordinator HOST:PORT", "--num-processes N", "--process-id I"):
        assert flag in text
