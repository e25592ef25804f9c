"""Ctrl-C (SIGINT) and SIGTERM as a request to stop at the next epoch boundary.

Inside `deferred()` the signals are only recorded; the training loop asks `requested()` between
epochs, saves a step checkpoint and raises `Interrupted` (a `KeyboardInterrupt`), so a signal
never tears a donated state, an Orbax save or an XLA compile.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []  # signals since the outermost deferred() began, oldest first
_depth = 0  # > 0 inside deferred(): signals are recorded, not raised


class Interrupted(KeyboardInterrupt):
    """A run stopped by `signum` (exit code 128 + signum); `where`: what was saved."""

    def __init__(self, signum: int, where: str = ""):
        super().__init__(signum, where)
        self.signum, self.where = signum, where

    def __str__(self) -> str:
        return f"{signal.Signals(self.signum).name} {self.where}".strip()


def _handle(signum: int, frame) -> None:
    _received.append(signum)
    if _depth == 0 and len(_received) == 1:  # not while a stop is already under way
        raise Interrupted(signum)


@contextlib.contextmanager
def installed(ignore_after_stop: bool = False) -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise `Interrupted`; after a stop, `ignore_after_stop` ignores
    them from then on (a second Ctrl-C cannot cut the exit short)."""
    if signal.getsignal(signal.SIGINT) is not _handle:  # the outermost: no stop under way yet
        _received.clear()
    previous = {signum: signal.signal(signum, _handle) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if ignore_after_stop and _received:
                handler = signal.SIG_IGN
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signum, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are recorded for `requested()`; a no-op off the main thread."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _received.clear()
    with installed():
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1


def requested() -> int | None:
    """The signal to stop for, or None; a collective in a multi-process run (the largest one)."""
    local = _received[0] if _received else 0
    if jax.process_count() > 1:  # ~3 ms over gloo on CPU, once an epoch
        local = int(np.max(multihost_utils.process_allgather(np.int32(local))))
    return local or None
