"""Noticing, within seconds, that another process of a `--distributed` run has died.

When a process is killed (kill -9, OOM, a lost host) the others learn it late and badly: a Gloo
collective fails with "Connection closed by peer", an Orbax save waits in a coordination-service
barrier until JAX's heartbeat timeout (100 s), and then JAX's C++ runtime aborts the survivor
(exit 134, a check-failure stack dump), at exit too, in its shutdown barrier. So each process
beats, once a second, in the coordination service's key-value store from a thread of its own,
and reads the others' beats: a process whose beat stops for `SILENT_S` seconds is reported in
one paragraph and this process leaves at once with `os._exit` (`EXIT_PEER_LOST`): a normal exit
would run JAX's atexit shutdown, whose barrier waits for the dead process and ends in that
abort. A process that finishes (or stops with the others after a signal or a NaN) writes `done`
instead of a beat, so a peer still writing its results is not taken for dead.

When process 0 dies, the coordination service dies with it and JAX aborts the others at once,
before any Python code can run: their exit is JAX's (134), not this module's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

# EX_TEMPFAIL of sysexits.h ("try again later"): not a user error to fix (2) nor a crash (1,
# 134): relaunching the same command is the whole fix, which a scheduler can act on by the code.
EXIT_PEER_LOST = 75
BEAT_S = 1.0
# A live process's beat comes from its own thread (JAX releases the GIL while it compiles and
# runs), so 10 s of silence is a dead or frozen process, not a busy one.
SILENT_S = 10.0
KEY = "calfuse/beat"


def lost_message(process: int, workdir: str | None) -> str:
    """The paragraph a surviving process prints."""
    where = f" in {workdir}" if workdir else ""
    return (
        f"error: process {process} of the run stopped (killed, crashed or its host lost; its own "
        "output says why), so this process stopped too. The step and task checkpoints saved so "
        f"far{where} are kept: relaunch every process with the same command to resume from them"
    )


@contextlib.contextmanager
def watched(args) -> Iterator[None]:
    """Within (a multi-process run): another process that stops beating ends this one with
    `lost_message` and `EXIT_PEER_LOST`. Leaving normally, or by a signal or a NaN/Inf (which
    every process sees at the same step), tells the others `done`; leaving by another error
    stops the beat, so the others report this process within `SILENT_S` seconds."""
    import jax

    if jax.process_count() == 1:
        yield
        return
    from jax._src import distributed  # noqa: PLC0415  (the client orbax uses too)

    client, me = distributed.global_state.client, jax.process_index()
    others = [p for p in range(jax.process_count()) if p != me]
    stop = threading.Event()

    def beat_and_check() -> None:
        seen = {p: (None, time.monotonic()) for p in others}
        beat = 0
        while not stop.wait(BEAT_S):
            beat += 1
            try:
                client.key_value_set(f"{KEY}/{me}", str(beat), allow_overwrite=True)
                beats = {p: _try_get(client, f"{KEY}/{p}") for p in others}
            except jax.errors.JaxRuntimeError:  # the service (process 0) is gone
                _leave(0, args)
            now = time.monotonic()
            for p, value in beats.items():
                if value == "done":
                    continue
                if value != seen[p][0]:
                    seen[p] = (value, now)
                elif now - seen[p][1] > SILENT_S and not stop.is_set():
                    _leave(p, args)

    thread = threading.Thread(target=beat_and_check, name="calfuse-peers", daemon=True)
    thread.start()
    from calfuse_jax.train import NonFiniteLossError  # noqa: PLC0415

    try:
        yield
    except (KeyboardInterrupt, NonFiniteLossError):
        _finish(stop, thread, client, me, done=True)
        raise
    except BaseException as error:
        if isinstance(error, RuntimeError) or "Gloo" in str(error):  # a collective's peer gone?
            stop.wait(SILENT_S + 2 * BEAT_S)  # the beats tell (and leave) if so
        _finish(stop, thread, client, me, done=False)
        raise
    _finish(stop, thread, client, me, done=True)


def _try_get(client, key: str) -> str | None:
    import jax

    try:
        return client.key_value_try_get(key)
    except jax.errors.JaxRuntimeError as err:
        if "NOT_FOUND" in str(err):  # not beaten yet
            return None
        raise


def _finish(stop: threading.Event, thread: threading.Thread, client, me: int, done: bool) -> None:
    stop.set()
    thread.join()
    if done:
        with contextlib.suppress(Exception):  # a dead service: nobody is left to tell
            client.key_value_set(f"{KEY}/{me}", "done", allow_overwrite=True)


def _leave(process: int, args) -> None:
    print(lost_message(process, getattr(args, "workdir", None)), file=sys.stderr, flush=True)
    logging.shutdown()  # flushes run.log
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)
