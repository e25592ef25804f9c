"""The on-disk side of the feature cache: keys, weight hashes, atomic files, verified manifests.

Entries hold finished `chunks/chunk-<start>-<end>-<sha256>.npy` while extraction runs (resumable),
then the arrays plus `manifest.json` (sha256, shape, dtype). Every load verifies every file (and
NaN/Inf); a damaged one is reported and recomputed. `entry_lock`: one process fills an entry.
A sha256 is always taken of the bytes in memory before they are written, so nothing read back
from the disk is ever certified; a chunk's sha256 is in its file name, so that the data and its
checksum appear together, in one rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from calfuse_jax.files import atomic_write, waiting_lock

# The single weight files from_pretrained reads, in order (`convert.WEIGHT_FILES`, what a folder
# may hold, adds the sharded "model.safetensors.index.json").
PRETRAINED_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".npz", ".ckpt")
_FILE_SHA_MEMO: dict[tuple, str] = {}


class FeatureCacheError(ValueError):
    """A cache problem that recomputing cannot solve; the message names the cause and the fix."""


def file_sha256(path) -> str:
    """sha256 (hex) of a file, memoised on (path, size, mtime) within the process."""
    stat = os.stat(path)
    memo_key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _FILE_SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _FILE_SHA_MEMO[memo_key] = digest.hexdigest()
    return _FILE_SHA_MEMO[memo_key]


def weights_id(path_or_hub_id: str | os.PathLike) -> str:
    """sha256 (hex) of a checkpoint's weights (a file, a folder, or a hub id): of the one weight
    file `from_pretrained` reads (comparable with the hub's LFS hash), else of `name:sha256` lines
    over the shards in `*.index.json` or every weight-like file."""
    path = Path(os.fspath(path_or_hub_id))
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        from calfuse_jax.models.hub import resolve

        path = resolve(path, ("config.json",), PRETRAINED_WEIGHT_FILES)
    files = _weight_files(path)
    if not files:
        raise FileNotFoundError(
            f"no weight file in {str(path)!r}: expected model.safetensors or pytorch_model.bin "
            "(a Hugging Face CLIP folder); write a random one with clip.random_checkpoint(folder)"
        )
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{f.name}:{file_sha256(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    for name in PRETRAINED_WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    for index in sorted(folder.glob("*.index.json")):
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def cache_key(fields: dict) -> str:
    """sha256 (hex, 24 chars) of the canonical JSON of `fields`."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def atomic_write_json(path: Path, payload: dict) -> None:
    """Writes `payload` as indented JSON so that `path` is either absent or complete."""
    atomic_write(path, "w", lambda f: json.dump(payload, f, indent=1, sort_keys=True, default=str))


def _npy(array: np.ndarray) -> tuple[bytes, str]:
    """(.npy bytes of `array`, their sha256 in hex)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def save_checked(path: Path, array: np.ndarray) -> str:
    """Writes `array` as .npy atomically; returns the sha256 (hex) of the bytes it wrote."""
    data, sha256 = _npy(array)
    atomic_write(path, "wb", lambda f: f.write(data))
    return sha256


def _load_checked(path: Path, sha256: str) -> np.ndarray:
    """The array in `path` if its bytes have `sha256` and it holds no NaN/Inf; else ValueError."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path.name}: sha256 mismatch")
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{path.name}: NaN/Inf values")
    return array


def discard(folder: Path, names: Sequence[str]) -> None:
    """Removes `names` (files or folders) of the damaged entry `folder`, to be rewritten."""
    for name in names:
        path = folder / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as error:
            raise FeatureCacheError(
                f"the feature cache entry {str(folder)!r} is damaged ({name}) and could not be "
                f"removed ({error}); delete that folder and run the same command again"
            ) from error


def load_verified(folder: Path, names: Sequence[str]) -> list[np.ndarray] | None:
    """`names` (.npy) from `folder`, verified against `manifest.json`; None when absent, or
    damaged (warned about and removed, to be rewritten)."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        arrays = []
        for name in names:
            entry = manifest["files"][name]
            array = _load_checked(folder / name, entry["sha256"])
            if list(array.shape) != entry["shape"] or array.dtype.str != entry["dtype"]:
                raise ValueError(f"{name}: shape/dtype {array.shape} {array.dtype} != manifest")
            arrays.append(array)
        return arrays
    except (OSError, ValueError, KeyError, TypeError) as error:  # JSONDecodeError: ValueError
        warnings.warn(
            f"feature cache {str(folder)!r} failed verification ({error}); recomputing it",
            stacklevel=3,
        )
        discard(folder, ("manifest.json", *names))
        return None


def write_verified(folder: Path, arrays: dict[str, np.ndarray], fields: dict) -> None:
    """Saves `arrays` ({file name: array}) and then the manifest that `load_verified` checks."""
    files = {}
    for name, array in arrays.items():
        sha256 = save_checked(folder / name, array)
        files[name] = {"sha256": sha256, "shape": list(array.shape), "dtype": array.dtype.str}
    atomic_write_json(folder / "manifest.json", {"fields": fields, "files": files})


def save_chunk(chunk_dir: Path, start: int, end: int, array: np.ndarray) -> None:
    """Keeps the finished chunk of rows start..end-1, its sha256 in the file name (so that the
    data and its checksum appear together, in one rename)."""
    data, sha256 = _npy(array)
    path = chunk_dir / f"chunk-{start:09d}-{end:09d}-{sha256}.npy"
    atomic_write(path, "wb", lambda f: f.write(data))


def load_chunk(chunk_dir: Path, start: int, end: int) -> np.ndarray | None:
    """The finished chunk of rows start..end-1 [end - start, D], or None (a damaged one is
    reported and removed)."""
    for path in sorted(chunk_dir.glob(f"chunk-{start:09d}-{end:09d}-*.npy")):
        try:
            array = _load_checked(path, path.stem.rsplit("-", 1)[1])
            if array.ndim != 2 or array.shape[0] != end - start:
                raise ValueError(f"{path.name}: shape {array.shape}, expected {end - start} rows")
            return array
        except (OSError, ValueError, EOFError) as error:
            warnings.warn(
                f"feature cache chunk {str(path)!r} failed verification ({error}); recomputing it",
                stacklevel=2,
            )
            discard(chunk_dir, (path.name,))
    return None


def write_checksums(folder: Path) -> None:
    """Records the sha256 of every file in `folder` in its `checksums.json` (last written)."""
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    atomic_write_json(folder / "checksums.json", files)


def checksums_match(folder: Path) -> bool:
    """Whether `folder` holds `checksums.json` and every file it lists, unchanged."""
    try:
        files = json.loads((folder / "checksums.json").read_text())
        return all(file_sha256(folder / name) == sha256 for name, sha256 in files.items())
    except (OSError, ValueError, AttributeError):  # absent, unreadable, not a JSON object
        return False


def entry_lock(folder: Path) -> contextlib.AbstractContextManager:
    """Holds the lock of the cache entry `folder` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    return waiting_lock(folder / ".lock", f"another process filling the feature cache {folder}")
