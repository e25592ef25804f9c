"""Launching real JAX processes for the multi-process tests (JAX's runtime over loopback).

Each child gets one CPU device (the 4-device XLA_FLAGS of conftest is dropped), so N processes
form an N-device global mesh, as N hosts with one accelerator each would.
"""

import os
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(command: Callable[[int, int], Sequence[str]], count: int = 2) -> list:
    """Starts `command(process_id, port)` for every process at once (one CPU device each, this
    checkout first on the path); their stdout and stderr go to one text pipe each."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    port = free_port()
    return [
        subprocess.Popen(
            list(command(pid, port)),
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for pid in range(count)
    ]


def run_processes(
    command: Callable[[int, int], Sequence[str]], count: int = 2, timeout: float = 240
) -> list[str]:
    """Runs `command(process_id, port)` for every process at once; returns their combined
    stdout/stderr logs after asserting that each exited 0 (its log's tail is the message)."""
    workers = start_processes(command, count)
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=timeout)[0])
    finally:
        for worker in workers:
            worker.kill()
    for pid, (worker, log) in enumerate(zip(workers, logs, strict=True)):
        assert worker.returncode == 0, f"process {pid}:\n{log[-3000:]}"
    return logs
