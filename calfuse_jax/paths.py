"""Where calfuse_jax keeps things on disk: the cache root and the downloaded data under it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(configured: str | os.PathLike | None = None) -> Path:
    """`configured` (e.g. config.cache_dir), else $CALFUSE_CACHE, else ~/.cache/calfuse_jax."""
    root = configured or os.environ.get("CALFUSE_CACHE") or "~/.cache/calfuse_jax"
    return Path(root).expanduser()


def data_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where datasets are fetched and unpacked: $CALFUSE_DATA, else `cache_root(cache_dir)/data`."""
    configured = os.environ.get("CALFUSE_DATA")
    return Path(configured).expanduser() if configured else cache_root(cache_dir) / "data"
