"""Ctrl-C (SIGINT) and SIGTERM as a request to stop at the next step boundary.

A `KeyboardInterrupt` raised at whatever bytecode a signal lands on can leave a donated train
state deleted, tear an Orbax save or abandon an XLA compile. Inside `deferred()` (the task loop of
`run_continual`) the two signals only record themselves; the training loop asks `requested()`
between steps, saves a step checkpoint and raises `Interrupted`, a `KeyboardInterrupt`, so
callers that catch that (notebooks, the CLI's exit 130/143) keep working. Signals that come while
stopping (during the save) wait for it. Under `jax.distributed`, JAX's preemption notifier owns
SIGTERM; then `requested()` is JAX's preemption sync point, so every process stops after the same
step, and a SIGINT to one process is passed on as that process's SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []  # signals since the outermost deferred() began, oldest first
_depth = 0  # > 0 inside deferred(): signals are recorded, not raised
_polls = 0  # calls of requested(): the same count on every process (JAX's sync step id)
_synced: list[int] = []  # the preemption sync point, once reached (JAX reports it only once)


class Interrupted(KeyboardInterrupt):
    """A run stopped by `signum`; `where` says what was saved (set by the loop that stopped)."""

    def __init__(self, signum: int, where: str = ""):
        super().__init__(signum, where)
        self.signum, self.where = signum, where

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def __str__(self) -> str:
        return f"{signal.Signals(self.signum).name} {self.where}".strip()


def _jax_owns_sigterm() -> bool:
    # jax.distributed.initialize installs a C++ SIGTERM handler that Python's signal module
    # cannot see (getsignal still says SIG_DFL); replacing it would blind JAX's preemption sync.
    from jax._src import distributed  # noqa: PLC0415  (orbax reads the same private state)

    return distributed.global_state.preemption_sync_manager is not None


def _handle(signum: int, frame) -> None:
    if _depth == 0:
        raise Interrupted(signum)
    _received.append(signum)
    if signum != signal.SIGTERM and _jax_owns_sigterm():
        signal.raise_signal(signal.SIGTERM)  # tell every process through JAX's notifier


@contextlib.contextmanager
def _installed(signals) -> Iterator[None]:
    previous = {signum: signal.signal(signum, _handle) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signum, handler)


def raising() -> contextlib.AbstractContextManager:
    """Within: SIGINT and SIGTERM raise `Interrupted` (inside `deferred()` they are recorded).
    For a command's main thread, entered before `jax.distributed.initialize` takes SIGTERM."""
    return _installed(SIGNALS)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are recorded for `requested()` instead of raising; the handlers
    found are back afterwards. Outside the main thread (no signals arrive there) a no-op."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _received.clear()
    with _installed([s for s in SIGNALS if not (s == signal.SIGTERM and _jax_owns_sigterm())]):
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1


def requested() -> int | None:
    """The signal to stop for now, or None. Called between steps, in the same order on every
    process of a multi-process run (it is a collective there: JAX's preemption sync point)."""
    global _polls
    _polls += 1
    if _jax_owns_sigterm():
        from jax.experimental import multihost_utils  # noqa: PLC0415

        if not _synced and multihost_utils.reached_preemption_sync_point(_polls):
            _synced.append(_received[0] if _received else signal.SIGTERM)
        return _synced[0] if _synced else None
    return _received[0] if _received else None


def stop_if_requested(where: str) -> None:
    """Raises `Interrupted(signal, where)` when `requested()` says so."""
    signum = requested()
    if signum is not None:
        raise Interrupted(signum, where)
