"""Atomic writes whose files get the permissions of an ordinary `open()`.

`tempfile.mkstemp` creates 0600 files and `mkdtemp` 0700 folders whatever the umask, so a
results folder or feature cache written through a temporary file and a rename would be
unreadable to the colleagues it is shared with. Everything written here ends with the mode a
plain `open(path, "w")` / `mkdir` would give: 0o666 / 0o777 minus the process umask.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import filelock

log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way to read it is to set it; restored at once (the gap is a few
    # instructions, and a file created in it by another thread would merely be 0o022-masked).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_open(path: str | os.PathLike) -> None:
    """Sets `path` (and, for a folder, everything under it) to the umask's default modes:
    0o666 & ~umask for files, 0o777 & ~umask for folders."""
    mask = current_umask()
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def atomic_write(path: str | os.PathLike, mode: str, write: Callable[[IO], None]) -> None:
    """Runs `write(file)` on a temporary file next to `path` (fsynced) and renames it to `path`:
    the file is either absent or complete, never partial, and has `open()`'s permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def temp_dir(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A new empty folder in `parent` (to fill, then rename into place) with `mkdir`'s mode;
    removed if the body fails. A library error that lost its errno on a full disk (safetensors')
    becomes OSError(ENOSPC), so the CLI reports it as the disk's problem."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    share_like_open(folder)
    try:
        yield folder
    except BaseException as error:
        shutil.rmtree(folder, ignore_errors=True)
        if not isinstance(error, OSError) and "No space left on device" in str(error):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) from error
        raise


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike, holder: str) -> Iterator[None]:
    """Holds the OS file lock `path`, logging that it waits for `holder` when another process has
    it. Released when its process ends, even by kill -9."""
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("waiting for %s", holder)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
