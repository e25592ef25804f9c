"""Real SIGINT/SIGTERM sent to real `python -m experiments.run` processes at seeded random moments
(during the first step's compilation, between steps, during a step checkpoint's save, a second
signal while the first one's save runs): each stops within 20 s with exit 130/143 and one line
naming the step checkpoint it saved, and the same command resumes to results byte-identical to
an uninterrupted run. Under --distributed a SIGTERM to one process stops both at the same step;
processes with different configs, a missing process and a malformed --coordinator exit 2."""

import json
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from processes import free_port, start_processes

from calfuse_jax.checkpoint import STEP_STRIDE
from experiments import cli, peers, run

# 4 tasks x 2 epochs x 2 steps, a step checkpoint after every epoch: much of training is saving.
COMMAND = [sys.executable, "-m", "experiments.run", "--config", "synthetic:smoke", "-q",
           "--config.train.epochs=2", "--config.train.checkpoint_every_steps=1"]  # fmt: skip
STOPPED = re.compile(
    r"interrupted by (SIG\w+)(?: at task (\d+), step (\d+) of \d+ \(step checkpoint saved\)"
    r"| before task (\d+) \(earlier ones saved\))?"
    r": run the same command again to resume\n$"
)
EXIT_WITHIN = 20.0  # seconds from the (first) signal to the exit


def launch(workdir: Path, cache: Path, *extra: str, count: int = 1, mismatch=False) -> list:
    """Starts the command (as `count` processes of one --distributed run when count > 1; with
    `mismatch`, process 1 trains 3 epochs instead of 4)."""
    command = [*COMMAND, "--workdir", str(workdir), f"--config.cache_dir={cache}", *extra]
    if count == 1:
        return start_processes(lambda pid, port: command, 1)
    return start_processes(
        lambda pid, port: [*command, "--distributed", "--coordinator", f"127.0.0.1:{port}",
                           "--num-processes", str(count), "--process-id", str(pid),
                           *(["--config.train.epochs=3"] if mismatch and pid else [])],
        count,
    )  # fmt: skip


def wait_for(condition, what: str, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {limit} s"
        time.sleep(0.05)


def newest_step(workdir: Path) -> int:
    steps = workdir / "checkpoints" / "steps"
    names = [int(p.name) for p in steps.iterdir() if p.name.isdigit()] if steps.is_dir() else []
    return max(names, default=0)


def stop(workers: list, rng: random.Random, signum: int, target: int = 0, then=None) -> list:
    """Sends `signum` to worker `target` (and `then` soon after); returns each worker's (exit
    code, output) after checking that all exited within EXIT_WITHIN of the first signal."""
    workers[target].send_signal(signum)
    sent = time.monotonic()
    if then is not None:
        time.sleep(rng.uniform(0.0, 0.3))
        workers[target].send_signal(then)
    results = [(w.wait(timeout=EXIT_WITHIN + 10), w.communicate()[0]) for w in workers]
    took = time.monotonic() - sent
    assert took < EXIT_WITHIN, f"exited {took:.1f} s after the signal: {results}"
    return results


def check_stopped(code: int, output: str, signum: int, workdir: Path) -> int | None:
    """The one-line exit of a stopped run; the step id (task * STEP_STRIDE + step) it saved, or
    after which finished task it stopped (task * STEP_STRIDE); None if before any."""
    assert code == 128 + signum, output
    assert "Traceback" not in output and "Fatal Python error" not in output, output
    found = STOPPED.search(output)
    assert found and found[1] == signal.Signals(signum).name, output
    assert not [p for p in workdir.rglob("*") if "tmp" in p.name], "a save was left half-done"
    if found[2] is not None:
        saved = int(found[2]) * STEP_STRIDE + int(found[3])
        assert newest_step(workdir) == saved
        return saved
    if found[4] is not None and int(found[4]) > 0:  # between tasks: the last one is saved
        assert (workdir / "checkpoints" / "tasks" / str(int(found[4]) - 1)).is_dir()
        return int(found[4]) * STEP_STRIDE
    return None  # stopped before training began: nothing new to save


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """One persistent XLA cache for the module's processes: each run after the first loads its
    compiled programs instead of compiling them again (about half of a run's CPU time)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("xla")))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        yield


def test_signals_stop_with_a_step_checkpoint_and_resume_identical(tmp_path):
    rng, cache = random.Random(2024), tmp_path / "cache"
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    # 6 epochs a task (48 steps, 24 step checkpoints): an epoch is one device program, so with
    # the module's compile cache 2 epochs left too little training for the SIGTERM to land in.
    longer = "--config.train.epochs=6"
    (uninterrupted,) = launch(reference, cache, longer)

    # Ctrl-C while the first step compiles (or just before training begins).
    (worker,) = launch(stopped, cache, longer)
    log = stopped / "run.log"
    wait_for(lambda: log.exists() and "fusion after each task" in log.read_text(), "training")
    time.sleep(rng.uniform(0.0, 1.0))
    ((code, output),) = stop([worker], rng, signal.SIGINT)
    seen = check_stopped(code, output, signal.SIGINT, stopped) or 0
    assert uninterrupted.wait(timeout=240) == 0

    # The same command resumes; SIGTERM mid-training, then a Ctrl-C soon after (often during
    # the step checkpoint's save, which it waits for); then the same command runs to the end.
    (worker,) = launch(stopped, cache, longer)
    wait_for(lambda: newest_step(stopped) > seen, "new step checkpoint")
    time.sleep(rng.uniform(0.0, 0.6))
    ((code, output),) = stop([worker], rng, signal.SIGTERM, then=signal.SIGINT)
    assert (check_stopped(code, output, signal.SIGTERM, stopped) or 0) > seen
    (worker,) = launch(stopped, cache, longer)
    assert worker.wait(timeout=240) == 0, worker.communicate()[0]
    for name in ("summary.json", "accuracy_matrix.csv"):
        assert (stopped / name).read_bytes() == (reference / name).read_bytes(), name
    rows = [
        {k: v for k, v in json.loads(line).items() if k != "train_seconds"}
        for path in (stopped, reference)
        for line in (path / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[: len(rows) // 2] == rows[len(rows) // 2 :]


def test_distributed_sigterm_stops_every_process_at_the_same_step(tmp_path):
    rng, cache, workdir = random.Random(7), tmp_path / "cache", tmp_path / "run"
    workers = launch(workdir, cache, count=2)
    wait_for(lambda: newest_step(workdir) > 0, "step checkpoint")
    time.sleep(rng.uniform(0.0, 0.6))
    results = stop(workers, rng, signal.SIGTERM, target=1)
    saved = [check_stopped(code, output, signal.SIGTERM, workdir) for code, output in results]
    assert saved[0] == saved[1] and saved[0] is not None, results

    # Another config in process 1, and a process whose peer never starts: exit 2 in seconds.
    started = time.monotonic()
    mismatched = launch(tmp_path / "mismatch", cache, count=2, mismatch=True)
    coordinator = f"127.0.0.1:{free_port()}"
    alone = launch(tmp_path / "alone", cache, "--distributed", "--coordinator", coordinator,
                   "--num-processes", "2", "--process-id", "0", "--peer-timeout", "3")  # fmt: skip
    outputs = [(w.wait(timeout=60), w.communicate()[0]) for w in [*mismatched, *alone]]
    assert time.monotonic() - started < 40, outputs
    assert [code for code, _ in outputs] == [cli.EXIT_USER_ERROR] * 3, outputs
    assert all("Traceback" not in output for _, output in outputs), outputs
    assert all("runs another config or command" in out for _, out in outputs[:2]), outputs
    assert f"not every process joined the run at {coordinator} within" in outputs[2][1], outputs


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:port", "host:99999", "a b:12"])
def test_malformed_coordinator_is_a_user_error(tmp_path, capsys, address):
    flags = ["--distributed", "--coordinator", address, "--num-processes", "2", "--process-id", "0"]
    argv = ["--config", "synthetic:smoke", "--workdir", str(tmp_path / "w"), "-q", *flags]
    assert run.main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"--coordinator {address!r} is not HOST:PORT" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_distributed_peer_killed_is_reported_and_the_relaunch_resumes(tmp_path):
    # kill -9 of process 1 mid-training: process 0 prints one paragraph within seconds and
    # exits EXIT_PEER_LOST (not JAX's abort 134 ~90 s later); both relaunched, the run finishes.
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    workers = launch(workdir, cache, count=2)
    wait_for(lambda: newest_step(workdir) > 0, "step checkpoint")
    workers[1].kill()
    killed = time.monotonic()
    code, output = workers[0].wait(timeout=60), workers[0].communicate()[0]
    took = time.monotonic() - killed
    assert code == peers.EXIT_PEER_LOST and took < peers.SILENT_S + 5, (took, output)
    assert "Traceback" not in output and "Check failure" not in output, output
    assert output.endswith(peers.lost_message(1, str(workdir)) + "\n"), output
    relaunched = launch(workdir, cache, count=2)
    outputs = [(w.wait(timeout=240), w.communicate()[0]) for w in relaunched]
    assert [c for c, _ in outputs] == [0, 0], outputs
    assert len(json.loads((workdir / "summary.json").read_text())["accuracy_matrix"]) == 4
