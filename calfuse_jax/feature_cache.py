"""The on-disk side of the feature cache: keys, weight hashes, atomic files, verified manifests.

Cache layout (`cache_dir/images/<key>/`, `cache_dir/text/<key>/`): finished
`chunks/chunk-<start>-<end>.npy` written atomically (temporary file, fsync, rename) while
extraction runs, so an interrupted run resumes from the finished chunks; at the end the arrays
(`features.npy` [N, D] float32 and `labels.npy` [N] int64, or `text.npy` [C, D]) plus
`manifest.json` holding their sha256, shapes and dtypes, checked on every load (a corrupted or
truncated cache is reported and recomputed, never used). Keys are `cache_key(fields)`: the
sha256 of everything that changes the numbers (see `calfuse_jax.features`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from calfuse_jax.files import atomic_write

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what from_pretrained reads, in order
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".npz", ".ckpt")
_FILE_SHA_MEMO: dict[tuple, str] = {}


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
    """sha256 (hex) identifying a checkpoint's weights: a file, a folder, or a cached hub id.

    For a folder (or a hub id, resolved to its local snapshot without network when cached) the
    weight file `from_pretrained` reads is hashed: `model.safetensors`, else `pytorch_model.bin`,
    else the shards named in `*.index.json`, else every weight-like file. One file -> its own
    sha256 (comparable with the hub's LFS hash); several -> sha256 over `name:sha256` lines.
    """
    path = Path(os.fspath(path_or_hub_id))
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        from calfuse_jax.models.convert import resolve

        path = resolve(path, ("config.json",), ("model.safetensors", "pytorch_model.bin"))
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
    for name in WEIGHT_FILES:
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


def atomic_save(path: Path, array: np.ndarray) -> None:
    """Writes `array` as .npy so that `path` is either absent or complete (never partial)."""
    atomic_write(path, "wb", lambda f: np.save(f, array))


def atomic_write_json(path: Path, payload: dict) -> None:
    """Writes `payload` as indented JSON, atomically like `atomic_save`."""
    atomic_write(path, "w", lambda f: json.dump(payload, f, indent=1, sort_keys=True, default=str))


def load_verified(folder: Path, names: Sequence[str]) -> list[np.ndarray] | None:
    """Loads `names` (.npy) from `folder` if `manifest.json` exists and sha256/shape/dtype match.

    Returns None when there is no cache; warns (at the caller of the feature function) and
    returns None for a corrupted one, removing its manifest so it is rewritten.
    """
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        arrays = []
        for name in names:
            entry = manifest["files"][name]
            if file_sha256(folder / name) != entry["sha256"]:
                raise ValueError(f"{name}: sha256 mismatch")
            array = np.load(folder / name, allow_pickle=False)
            if list(array.shape) != entry["shape"] or array.dtype.str != entry["dtype"]:
                raise ValueError(f"{name}: shape/dtype {array.shape} {array.dtype} != manifest")
            arrays.append(array)
        return arrays
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        warnings.warn(
            f"feature cache {str(folder)!r} failed verification ({error}); recomputing it",
            stacklevel=3,
        )
        manifest_path.unlink(missing_ok=True)
        return None


def write_verified(folder: Path, arrays: dict[str, np.ndarray], fields: dict) -> None:
    """Saves `arrays` ({file name: array}) and then the manifest that `load_verified` checks."""
    files = {}
    for name, array in arrays.items():
        atomic_save(folder / name, array)
        files[name] = {
            "sha256": file_sha256(folder / name),
            "shape": list(array.shape),
            "dtype": array.dtype.str,
        }
    atomic_write_json(folder / "manifest.json", {"fields": fields, "files": files})


def chunk_path(chunk_dir: Path, start: int, end: int) -> Path:
    """File of the finished chunk holding rows start..end-1."""
    return chunk_dir / f"chunk-{start:09d}-{end:09d}.npy"


def load_chunk(path: Path, rows: int) -> np.ndarray | None:
    """A finished chunk [rows, D], or None when it is absent, unreadable or the wrong size."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return array if array.ndim == 2 and array.shape[0] == rows else None
