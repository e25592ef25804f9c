"""Frozen-encoder features, computed once per (weights, preprocessing, dataset) and cached on disk
under `cache_dir/images/<key>/` and `cache_dir/text/<key>/` (`calfuse_jax.feature_cache`). The key
hashes everything that changes the numbers, so every method and seed shares one entry.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from calfuse_jax import sharding
from calfuse_jax.feature_cache import (
    FeatureCacheError,
    atomic_write_json,
    cache_key,
    entry_lock,
    load_chunk,
    load_verified,
    save_chunk,
    write_verified,
)
from calfuse_jax.preprocess import device_preprocess, resolve_preprocess

TEXT_VERSION = "text-normalised-template-mean-v1"


def default_compute_dtype() -> jnp.dtype:
    """bfloat16 on GPU/TPU, float32 on CPU."""
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32


def make_image_encoder(
    model, params, mesh, compute_dtype, device_size: int | None = None
) -> Callable[[np.ndarray], jax.Array]:
    """host pixels float32 [B, S, S, 3] (B a multiple of the mesh size; uint8 [B, H, W, 3] with
    `device_size` S) -> float32 features [B, D] split over `data`; params replicated once."""
    jitted = _jitted_encoder(with_compute_dtype(model, compute_dtype), mesh, device_size)
    device_params = sharding.replicate(params, mesh)
    return lambda pixels: jitted(device_params, sharding.shard_batch(pixels, mesh))


def with_compute_dtype(model, compute_dtype):
    """`model` computing in `compute_dtype` (a module without a `dtype` field as it is)."""
    has_dtype = "dtype" in {f.name for f in dataclasses.fields(model)}
    return model.clone(dtype=compute_dtype) if has_dtype else model


def encode_images(model, params, pixels: jax.Array, device_size: int | None = None) -> jax.Array:
    """pixels [B, S, S, 3] (or uint8 [B, H, W, 3] with `device_size`) -> float32 [B, D]."""
    if device_size is not None:
        pixels = device_preprocess(pixels, device_size)
    return model.apply({"params": params}, pixels, method=model.encode_image).astype(jnp.float32)


@functools.lru_cache(maxsize=8)
def _jitted_encoder(model, mesh, device_size: int | None = None):
    """One compiled encoder per (module, mesh, path), reused by the next dataset."""
    return jax.jit(
        functools.partial(encode_images, model, device_size=device_size),
        in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
        out_shardings=sharding.data_sharding(mesh),
    )


def _fetch(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _host_batch(ds, indices, plan: _Plan) -> np.ndarray:
    """Decoded, preprocessed `indices` zero-padded to `plan.batch` rows: float32 [batch, S, S, 3]
    (device path: uint8 [batch, H, W, 3])."""
    if plan.preprocess is None:
        pixels = np.stack(ds.load_batch(indices))
        if pixels.shape[1:] != (*ds.fixed_size, 3) or pixels.dtype != np.uint8:
            raise ValueError(
                f"{ds.identity!r} says its images are uint8 {ds.fixed_size} (fixed_size) but "
                f"gave {pixels.dtype} {pixels.shape[1:]}; run with preprocess_path='host' "
                "(--config.features.preprocess=host)"
            )
    else:
        pixels = np.asarray(plan.preprocess(ds.load_batch(indices), plan.image_size), np.float32)
    return np.pad(pixels, [(0, plan.batch - len(indices))] + [(0, 0)] * (pixels.ndim - 1))


def _model_fields(model) -> dict:
    arch = getattr(model, "arch", None)
    return {"model": type(model).__name__, "arch": None if arch is None else repr(arch)}


def image_features(
    ds,
    model,
    params,
    *,
    cache_dir: str | os.PathLike,
    weights_id: str,
    image_size: int | None = None,
    batch_size: int = 256,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    compute_dtype=None,
    chunk_size: int | None = None,
    num_workers: int | None = None,
    preprocess: Callable | None = None,
    preprocess_path: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [N, D], not normalised; labels int64 [N]) of every item of `ds` (see
    `calfuse_jax.data.images`), cached under `cache_dir`.

    Args:
      model, params: `model.encode_image` maps [B, S, S, 3] to [B, D]; S is `image_size`
        (default `model.image_size`). `weights_id`: `feature_cache.weights_id(checkpoint)`.
      batch_size, mesh: images per encoder call, rounded up to a multiple of the device count;
        a `data` mesh (default all devices).
      compute_dtype: default `default_compute_dtype()` (bfloat16 on GPU/TPU, float32 on CPU).
      chunk_size: images per resumable chunk file (default about 4096, a multiple of the batch).
      num_workers: host decoding threads (default `default_workers()`, the usable cores).
      preprocess: `(images, S) -> float32 [B, S, S, 3]`; default `clip.preprocess`.
      preprocess_path: "host" (threads run `preprocess`), "device" (uint8 images to the device,
        `device_preprocess` in the encoder; needs `ds.fixed_size`) or "auto" (device when
        `ds.fixed_size` and no custom `preprocess`, else host). Part of the cache key.

    Raises ValueError for an empty `ds`, ImageDecodeError naming an image that cannot be decoded,
    FeatureCacheError when the encoder returns NaN/Inf (nothing is cached for them).
    """
    if len(ds) == 0:
        raise ValueError(f"dataset {ds.identity!r} is empty: nothing to encode")
    preprocess, preprocess_version = resolve_preprocess(preprocess, preprocess_path, ds)
    image_size = int(image_size or model.image_size)
    mesh = mesh or sharding.make_mesh()
    compute_dtype = jnp.dtype(compute_dtype or default_compute_dtype())
    labels = np.asarray(ds.labels, dtype=np.int64)
    fields = {"kind": "image", "weights_id": weights_id, **_model_fields(model),
              "image_size": image_size, "compute_dtype": compute_dtype.name,
              "preprocess": preprocess_version, "dataset": ds.identity}  # fmt: skip
    folder = Path(cache_dir) / "images" / cache_key(fields)
    plan = _Plan.make(preprocess, image_size, len(ds), mesh, batch_size, chunk_size, num_workers)
    with _locked(folder):
        if (cached := _cached(folder, labels)) is not None:
            return cached
        atomic_write_json(folder / "key.json", fields)  # for people browsing the cache
        on_device = None if preprocess else image_size
        encoder = lambda: make_image_encoder(model, params, mesh, compute_dtype, on_device)
        features = _extract_chunks(ds, folder / "chunks", encoder, plan, progress)
        if sharding.is_primary():
            write_verified(folder, {"features.npy": features, "labels.npy": labels}, fields)
            shutil.rmtree(folder / "chunks", ignore_errors=True)
    return features, labels


def _cached(folder: Path, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The verified (features, labels) of the cache entry `folder` if it holds `labels`."""
    cached = load_verified(folder, ("features.npy", "labels.npy"))
    if cached is not None and not np.array_equal(cached[1], labels):
        warnings.warn(f"feature cache {folder} holds other labels; recomputing", stacklevel=3)
        return None
    return None if cached is None else (cached[0], cached[1])


@contextlib.contextmanager
def _locked(folder: Path):
    """One process at a time fills the entry `folder` (process 0 holds the lock for all)."""
    with entry_lock(folder) if sharding.is_primary() else contextlib.nullcontext():
        sharding.barrier("calfuse_feature_cache_locked")
        yield


@dataclasses.dataclass(frozen=True)
class _Plan:
    preprocess: Callable | None  # None: uint8 images to the device (`device_preprocess`)
    image_size: int
    batch: int  # rows per encoder call, a multiple of the device count
    chunk: int  # rows per resumable chunk file, a multiple of `batch`
    workers: int  # host threads decoding ahead of the device

    @classmethod
    def make(cls, preprocess, image_size, total, mesh, batch_size, chunk_size, workers) -> _Plan:
        """`image_features`' arguments (None: the defaults) made into a plan."""
        batch = min(sharding.padded_size(batch_size, mesh), sharding.padded_size(total, mesh))
        chunk = max(1, (chunk_size or max(4096, batch)) // batch) * batch
        return cls(preprocess, image_size, batch, chunk, workers or default_workers())


def default_workers() -> int:
    """Host decoding threads: the cores this process may use (PIL and NumPy release the GIL)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _extract_chunks(ds, chunk_dir: Path, make_encoder, plan: _Plan, progress: bool) -> np.ndarray:
    """Encodes every chunk without a finished file; returns float32 [N, D]. Host threads prepare
    `workers + 1` batches ahead of the device."""
    from tqdm.auto import tqdm

    total, batch = len(ds), plan.batch
    bounds = [(s, min(s + plan.chunk, total)) for s in range(0, total, plan.chunk)]
    done = {i: load_chunk(chunk_dir, s, e) for i, (s, e) in enumerate(bounds)}
    done = {i: a for i, a in done.items() if a is not None}
    jobs = [(i, s) for i, (a, b) in enumerate(bounds) if i not in done for s in range(a, b, batch)]
    initial = sum(len(a) for a in done.values())
    bar = tqdm(
        total=total, initial=initial, unit="img", desc="image features", disable=not progress
    )
    encoder = make_encoder() if jobs else None
    with concurrent.futures.ThreadPoolExecutor(plan.workers) as pool:
        futures = (
            pool.submit(_host_batch, ds, range(s, min(s + batch, bounds[i][1])), plan)
            for i, s in jobs
        )
        ahead = collections.deque(itertools.islice(futures, plan.workers + 1))
        parts: list[np.ndarray] = []
        try:
            for i, start in jobs:
                pixels = ahead.popleft().result()
                ahead.extend(itertools.islice(futures, 1))
                rows = min(batch, bounds[i][1] - start)
                parts.append(_fetch(encoder(pixels))[:rows])
                bar.update(rows)
                if start + batch >= bounds[i][1]:  # chunk finished: keep it on disk
                    done[i] = np.concatenate(parts)
                    parts = []
                    _check_finite(done[i], bounds[i][0], ds)
                    if sharding.is_primary():
                        save_chunk(chunk_dir, *bounds[i], done[i])
        finally:  # interrupted: drop the queued host work instead of finishing it
            for future in ahead:
                future.cancel()
    bar.close()
    return np.concatenate([done[i] for i in range(len(bounds))]).astype(np.float32)


def _check_finite(features: np.ndarray, start: int, ds) -> None:
    """NaN/Inf features [rows, D] (chunk from row `start`) are never cached: FeatureCacheError."""
    bad = start + np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad.size:
        raise FeatureCacheError(
            f"the image encoder returned NaN/Inf features for {bad.size} images of "
            f"{ds.identity!r} (first rows {bad[:5].tolist()}); nothing was cached for them. "
            "Check the weights (a damaged or diverged checkpoint gives NaN) and the images."
        )


def text_features(
    class_names: Sequence[str],
    model,
    params,
    tokenizer,
    *,
    templates: Sequence[str] = ("a good photo of a {}.",),
    cache_dir: str | os.PathLike,
    weights_id: str,
    batch_size: int = 256,
) -> np.ndarray:
    """L2-normalised text embeddings of the class prompts, float32 [C, D], cached.

    Each prompt is `template.format(name)`, so every template needs `{}`; several templates
    average the normalised embeddings and renormalise (CLIP's prompt ensembling). Names are used
    as given (`class_names.prompt_names` turns `_` into spaces).
    """
    names, templates = list(class_names), list(templates)
    if not names or not templates:
        raise ValueError("text_features needs at least one class name and one template")
    if bad := [t for t in templates if "{}" not in t]:
        raise ValueError(f"templates must contain '{{}}' for the class name: {bad}")
    fields = {"kind": "text", "weights_id": weights_id, **_model_fields(model),
              "version": TEXT_VERSION, "names": names, "templates": templates}  # fmt: skip
    folder = Path(cache_dir) / "text" / cache_key(fields)
    with _locked(folder):
        cached = load_verified(folder, ("text.npy",))
        if cached is not None:
            return cached[0]
        prompts = [t.format(name) for name in names for t in templates]
        tokens = np.asarray(tokenizer(prompts), dtype=np.int32)  # [C * T, L]
        encode = jax.jit(
            lambda p, x: model.apply({"params": p}, x, method=model.encode_text).astype(jnp.float32)
        )
        batch = min(batch_size, len(tokens))
        outputs = []
        for start in range(0, len(tokens), batch):
            part = tokens[start : start + batch]
            padded = np.concatenate([part, np.repeat(part[-1:], batch - len(part), 0)])
            outputs.append(np.asarray(encode(params, padded))[: len(part)])
        embeddings = normalise(np.concatenate(outputs).reshape(len(names), len(templates), -1))
        text = normalise(embeddings.mean(axis=1))  # [C, D]
        if not np.isfinite(text).all():
            raise FeatureCacheError(
                "the text encoder returned NaN/Inf embeddings; nothing was cached. Check the "
                "weights (a damaged or diverged checkpoint gives NaN)."
            )
        if sharding.is_primary():
            write_verified(folder, {"text.npy": text}, fields)
    return text


def normalise(x: np.ndarray) -> np.ndarray:
    """x / ||x|| along the last axis (float64 inside for a stable cache)."""
    x64 = np.asarray(x, dtype=np.float64)
    return (x64 / np.linalg.norm(x64, axis=-1, keepdims=True)).astype(np.float32)
