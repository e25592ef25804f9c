"""Noticing, within seconds, that another process of a `--distributed` run has died.

Each process beats once a second in the coordination service's key-value store; a peer silent for
`SILENT_S` is reported and this process leaves with `os._exit(EXIT_PEER_LOST)` (JAX's own exit
would wait for the dead peer, then abort). A finished process writes `done` instead of a beat.
When process 0 dies, the coordination service dies with it and JAX aborts the others at once,
before any Python code can run: their exit is JAX's (134), not this module's 75."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

EXIT_PEER_LOST = 75  # EX_TEMPFAIL of sysexits.h: relaunching the same command is the fix
BEAT_S = 1.0
SILENT_S = 10.0  # beats come from a thread of their own: silence is a dead process, not a busy one
KEY = "calfuse/beat"


def lost_message(process: int, workdir: str | None) -> str:
    where = f" in {workdir}" if workdir else ""
    return (
        f"error: process {process} of the run stopped (killed, crashed or its host lost; its own "
        "output says why), so this process stopped too. The step and task checkpoints saved so "
        f"far{where} are kept: relaunch every process with the same command to resume from them"
    )


@contextlib.contextmanager
def watched(args) -> Iterator[None]:
    """Within (a multi-process run): another process that stops beating ends this one. Leaving
    normally, or by a signal or a NaN/Inf (seen by every process), tells the others `done`."""
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
                if value != seen[p][0]:
                    seen[p] = (value, now)
                elif value != "done" and now - seen[p][1] > SILENT_S and not stop.is_set():
                    _leave(p, args)

    thread = threading.Thread(target=beat_and_check, name="calfuse-peers", daemon=True)
    thread.start()
    from calfuse_jax.train import NonFiniteLossError  # noqa: PLC0415

    done = True
    try:
        yield
    except BaseException as error:
        if not isinstance(error, (KeyboardInterrupt, NonFiniteLossError)):
            done = False  # the beat stops, so the others report this process
            if isinstance(error, RuntimeError) or "Gloo" in str(error):  # a collective's peer?
                stop.wait(SILENT_S + 2 * BEAT_S)  # the beats tell (and leave) if so
        raise
    finally:
        stop.set()
        thread.join()
        if done:
            with contextlib.suppress(Exception):  # a dead service: nobody is left to tell
                client.key_value_set(f"{KEY}/{me}", "done", allow_overwrite=True)


def _try_get(client, key: str) -> str | None:
    import jax

    try:
        return client.key_value_try_get(key)
    except jax.errors.JaxRuntimeError as err:
        if "NOT_FOUND" in str(err):  # not beaten yet
            return None
        raise


def _leave(process: int, args) -> None:
    print(lost_message(process, getattr(args, "workdir", None)), file=sys.stderr, flush=True)
    logging.shutdown()  # flushes run.log
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)
