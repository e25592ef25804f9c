"""The run folder: which run it holds (`claim`), who may write it (`lock`), its JSON and CSV."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calfuse_jax import sharding
from calfuse_jax.config import method_config
from calfuse_jax.files import atomic_write

# The fields a resumed run may change: where things are, how they are shown, and what changes
# neither the maths nor the data order (the feature digest still refuses other encoder rounding).
RESUME_SAFE = (
    "progress",
    "cache_dir",
    "features.batch_size",
    "features.preprocess",
    "dataset.root",
    "dataset.data_dir",
    "dataset.download",
    "dataset.mirror",
    "outputs.plots",
    "outputs.tensorboard",
    "outputs.seeds_together",
    "train.checkpoint_every_steps",
    "train.eval_batch_size",
)
FINGERPRINT_FILE = "run_fingerprint.json"
LOCK_FILE = ".lock"
ASIDE = "overwritten-"  # prefix of the folders `--overwrite` moves a run into
CONFIG_FILE = "config.json"
LOOP_FILES = ("checkpoints", "metrics.jsonl", "accuracy_matrix.csv")  # run_continual writes these
RESULT_FILES = (*LOOP_FILES, FINGERPRINT_FILE, "summary.json")

logger = logging.getLogger("calfuse_jax")


class RunFolderError(ValueError):
    """A run folder the user fixes from the message: busy, foreign, or a damaged file."""


class ConfigMismatchError(RunFolderError):
    """The workdir holds a run of another configuration (or data)."""


def jsonable(value: Any) -> Any:
    """`value` with tuples, arrays, NumPy scalars and paths as JSON types (NaN, Inf -> None)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value) if isinstance(value, Path) else value


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented JSON atomically."""
    atomic_write(path, "w", lambda f: f.write(json.dumps(jsonable(obj), indent=2) + "\n"))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`; RunFolderError naming the file when it is damaged."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        fix = _CONFIG_FIX if Path(path).name == CONFIG_FILE else _FIX
        raise RunFolderError(f"{path} is damaged ({error}); {fix}") from error


_FIX = "running the same command again rebuilds it from the checkpoints, or delete it"
_CONFIG_FIX = (
    "it alone records the run's config, so it is not rebuilt: restore it, or move the run "
    "aside with --overwrite (overwrite=True)"
)


def readable_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`, or None when it is absent or damaged (logged)."""
    if not Path(path).exists():
        return None
    try:
        return read_json(path)
    except RunFolderError as error:
        logger.warning("%s", error)
        return None


def about(workdir: str | os.PathLike) -> dict:
    """`extra=` of a log line about the run in `workdir` (see `log_filter`)."""
    return {"run": Path(workdir).absolute()}


def log_filter(workdir: str | os.PathLike) -> Callable[[logging.LogRecord], bool]:
    """Keeps the log lines `about` the run in `workdir` and those about no run in particular,
    so the run.log of runs trained side by side holds only its own run's lines."""
    own = Path(workdir).absolute()
    return lambda record: getattr(record, "run", own) == own


def write_results(workdir: Path, rows: list[dict], accuracy: np.ndarray) -> None:
    """Rewrites `metrics.jsonl` and `accuracy_matrix.csv` [T, T] in full (process 0 only)."""
    lines = "".join(json.dumps(jsonable(row)) + "\n" for row in rows)
    atomic_write(Path(workdir) / "metrics.jsonl", "w", lambda f: f.write(lines))
    header = "after_task," + ",".join(f"task_{j}" for j in range(accuracy.shape[1]))
    body = [
        f"{i}," + ",".join("" if np.isnan(v) else f"{v:.4f}" for v in accuracy[i])
        for i in range(len(rows))
    ]
    table = "\n".join([header, *body]) + "\n"
    atomic_write(Path(workdir) / "accuracy_matrix.csv", "w", lambda f: f.write(table))


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """Rows of workdir/metrics.jsonl; [] when absent."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{path} is damaged ({error}); {_FIX}") from error


def flat(tree: dict, prefix: str = "") -> dict:
    """{"a.b": leaf} of a nested dict (tuples as lists, the way they read back from JSON)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple | list) else value
    return out


def differences(old: dict, new: dict, ignore: Sequence[str] = ()) -> list[str]:
    """`key: old -> new` for every flattened field that differs, except `RESUME_SAFE`/`ignore`."""
    old, new = flat(jsonable(old)), flat(jsonable(new))
    skip = {*RESUME_SAFE, *ignore}
    keys = sorted(k for k in old.keys() | new.keys() if k not in skip)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _method_fields(reference: dict, values: dict, prefix: str = "") -> dict:
    out = {}
    for key, default in reference.items():
        path = f"{prefix}{key}"
        if isinstance(default, dict):
            out[key] = _method_fields(default, values.get(key, {}), path + ".")
        elif path not in RESUME_SAFE:
            item = values.get(key, default)
            out[key] = list(item) if isinstance(item, tuple) else item
    return out


def config_fingerprint(config, stream, scale: float) -> dict:
    """The identity of a run: method fields (not `RESUME_SAFE`), logit scale, a data digest."""
    digest = hashlib.sha256()
    for array in (stream.split.class_order, stream.split.bounds, stream.train_labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    for array in (stream.train_features, stream.test_features):
        digest.update(np.ascontiguousarray(array[::97]).tobytes())  # a cheap, stable sample
        digest.update(str(array.shape).encode())
    fields = _method_fields(method_config().to_dict(), config.to_dict())
    doc = {"config": fields, "logit_scale": scale, "data": digest.hexdigest()}
    doc["fingerprint"] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
    return doc


def _content(workdir: Path) -> list[Path]:
    """What `workdir` holds besides its lock and earlier runs moved aside."""
    if not workdir.is_dir():
        return []
    return [p for p in workdir.iterdir() if p.name != LOCK_FILE and not p.name.startswith(ASIDE)]


def refuse_foreign(workdir: Path) -> None:
    """Raises when `workdir` holds files but no calfuse results (someone else's folder)."""
    known = (CONFIG_FILE, *RESULT_FILES)
    if _content(workdir) and not any((workdir / name).exists() for name in known):
        raise RunFolderError(
            f"workdir {workdir} is not empty and holds no calfuse results; pass an empty or new "
            "--workdir (nothing was written)"
        )


def claim(
    workdir: Path,
    record: str,
    identity: dict,
    overwrite: bool,
    ignore: Sequence[str] = (),
    guarded: Sequence[str] = LOOP_FILES,
    keep: Sequence[str] = (),
) -> bool:
    """Accepts `workdir` for the run `identity` (stored in `record`, compared but `ignore`);
    True when it holds that run already. Another run, or `guarded` files without a readable
    `record`, raise ConfigMismatchError, or with `overwrite` are moved aside (but `keep`)."""
    present = [name for name in (record, *guarded) if (workdir / name).exists()]
    if not present:
        return False
    old = readable_json(workdir / record)
    diff = differences(old, identity, ignore) if old is not None else None
    if diff == []:
        return True
    if not overwrite:
        if diff:
            more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
            what = f"a run of a different config ({', '.join(diff[:5])}{more})"
        else:
            what = f"results ({', '.join(present)}) without a readable {record}"
        raise ConfigMismatchError(
            f"workdir {workdir} holds {what}. Pass --overwrite (overwrite=True) to move it aside "
            "into overwritten-<time>/, or choose another --workdir; nothing was changed."
        )
    sharding.barrier("calfuse_claim_inspected")  # every process decided on the untouched folder
    if sharding.is_primary():
        aside = move_aside(workdir, keep)
        logger.warning("overwrite: moved the old run's content in %s to %s", workdir, aside)
    sharding.barrier("calfuse_claim_moved")
    return False


def move_aside(workdir: Path, keep: Sequence[str] = (), target: Path | None = None) -> Path:
    """Moves `_content(workdir)` but `keep` into `target` (default: a new overwritten-<time>/)."""
    target = target or workdir / time.strftime(f"{ASIDE}%Y%m%d-%H%M%S")
    moving = [p for p in _content(workdir) if p.name not in keep and p != target]
    target.mkdir()
    for item in moving:
        os.replace(item, target / item.name)
    return target


def prepare_workdir(workdir: Path, doc: dict, overwrite: bool) -> None:
    """`run_continual`'s claim for fingerprint `doc`; (re)writes the fingerprint file."""
    stamp = workdir / FINGERPRINT_FILE
    rebuild = stamp.exists() and not overwrite and readable_json(stamp) is None
    resumed = rebuild or claim(workdir, FINGERPRINT_FILE, doc, overwrite, ignore=("fingerprint",))
    sharding.barrier("calfuse_workdir_inspected")
    if sharding.is_primary() and (rebuild or not resumed):
        write_json(stamp, doc)
    sharding.barrier("calfuse_prepare_workdir")


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds the fcntl lock `workdir/.lock` (process 0 only); removes a folder it created empty."""
    workdir = Path(workdir).absolute()
    if not sharding.is_primary():
        yield
        return
    created = not workdir.exists()
    fd = _acquire(workdir)
    try:
        yield
    finally:
        if created and not _content(workdir):  # a refused or failed start leaves no trace
            (workdir / LOCK_FILE).unlink()
            with contextlib.suppress(OSError):
                workdir.rmdir()
        os.close(fd)


def _acquire(workdir: Path) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(
                f"workdir {workdir} is in use by another run ({holder}); wait for it to finish "
                "or stop it, or choose another --workdir (nothing was written)"
            ) from None
        # a holder releasing a folder it created removes the file: then lock the new one
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
    return fd
