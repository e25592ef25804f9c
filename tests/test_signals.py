"""Real SIGTERM/SIGINT delivered to this process inside `run_continual` (as a notebook's Ctrl-C
or a scheduler's SIGTERM would arrive): the run stops at the next epoch boundary with a step
checkpoint, raises a KeyboardInterrupt, and resumes bit for bit; outside the loop the handlers
found before are back."""

import os
import signal

import pytest
from test_continual import (
    _assert_same_run,
    reference,  # noqa: F401  (the fixture, used by name)
    tiny_config,
)

from calfuse_jax import interrupt
from calfuse_jax.continual import run_continual

STRIDE = 10_000_000  # checkpoint.STEP_STRIDE: step checkpoint folders are task * STRIDE + step


def test_signals_stop_at_an_epoch_boundary_and_resume_bit_identical(reference, tmp_path):  # noqa: F811
    stream, text, expected, _ = reference
    before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}

    def signal_at_task_1_step_3(task, step):
        if (task, step) == (1, 3):  # SIGTERM, then a Ctrl-C while the first is handled
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt) as stopped:
        run_continual(
            stream, text, tiny_config(), tmp_path, progress=False,
            step_callback=signal_at_task_1_step_3,
        )  # fmt: skip
    # The first signal names the stop; it is seen after the next epoch (step 6), which is saved.
    assert isinstance(stopped.value, interrupt.Interrupted)
    assert stopped.value.signum == signal.SIGTERM
    assert str(stopped.value) == "SIGTERM at task 1, step 6 of 9 (step checkpoint saved)"
    assert (tmp_path / "checkpoints" / "steps" / str(1 * STRIDE + 6)).exists()
    assert {s: signal.getsignal(s) for s in interrupt.SIGNALS} == before

    def ctrl_c_before_task_2(task, step):
        if (task, step) == (1, 9):  # the task's last epoch: the task finishes and is saved
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(interrupt.Interrupted, match=r"^SIGINT before task 2 "):
        run_continual(
            stream, text, tiny_config(), tmp_path, progress=False,
            step_callback=ctrl_c_before_task_2,
        )  # fmt: skip
    assert (tmp_path / "checkpoints" / "tasks" / "1").exists()
    _assert_same_run(run_continual(stream, text, tiny_config(), tmp_path, progress=False), expected)
