"""Frozen-encoder features, computed once per (weights, preprocessing, dataset) and cached on disk.

    feats, labels = image_features(ds, model, params, cache_dir=..., weights_id=..., image_size=224)
    text = text_features(names, model, params, tokenizer, cache_dir=..., weights_id=...)

The cache (resumable chunk files and arrays, all sha256-verified, NaN/Inf never kept; one
process at a time per entry; `calfuse_jax.feature_cache`) lives under `cache_dir/images/<key>/`
and `cache_dir/text/<key>/`. The key is the sha256 of the weights id, model architecture, image
size, compute dtype, preprocessing version and `ds.identity`, so every method and seed shares one
cache and anything that changes the numbers changes the key. An image that cannot be decoded
stops the extraction with `ImageDecodeError` naming the file.

Extraction: batches are decoded and preprocessed on host threads (PIL releases the GIL) a few
batches ahead of the device (a source whose images share one size, `ds.fixed_size`, sends uint8
[B, H, W, 3] instead, preprocessed inside the jitted encoder: `preprocess.device_preprocess`),
padded to one batch shape (one trace), split over the devices of a `data` mesh (`NamedSharding`),
encoded by one jitted function, and shown on a tqdm bar with images/s and ETA. Compute dtype:
bfloat16 on GPU/TPU, float32 on CPU, unless given.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
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


# ----------------------------------------------------------------------------------------------
# Image features


def default_compute_dtype() -> jnp.dtype:
    """bfloat16 on GPU/TPU (halves memory traffic, tensor cores), float32 on CPU."""
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32


def make_image_encoder(
    model, params, mesh, compute_dtype, device_size: int | None = None
) -> Callable[[np.ndarray], jax.Array]:
    """host pixels float32 [B, H, W, 3] (B a multiple of the mesh size) -> features [B, D].

    One jitted function; parameters replicated once, pixels split over the `data` axis, output
    float32 split the same way. Pixels are not donated: the output has another shape, so XLA
    could not reuse their buffer anyway. With `device_size` S the pixels are uint8 images
    [B, H, W, 3] of any one size, preprocessed to [B, S, S, 3] inside the same function.
    """
    jitted = _jitted_encoder(with_compute_dtype(model, compute_dtype), mesh, device_size)
    device_params = sharding.replicate(params, mesh)
    return lambda pixels: jitted(device_params, sharding.shard_batch(pixels, mesh))


def with_compute_dtype(model, compute_dtype):
    """`model` computing in `compute_dtype` (a module without a `dtype` field as it is)."""
    if "dtype" in {f.name for f in dataclasses.fields(model)}:
        return model.clone(dtype=compute_dtype)
    return model


def encode_images(model, params, pixels: jax.Array, device_size: int | None = None) -> jax.Array:
    """pixels [B, S, S, 3] -> float32 features [B, D] (traceable; jit it, or a caller's jit).
    With `device_size` S: pixels are uint8 images [B, H, W, 3], `device_preprocess`ed first."""
    if device_size is not None:
        pixels = device_preprocess(pixels, device_size)
    return model.apply({"params": params}, pixels, method=model.encode_image).astype(jnp.float32)


@functools.lru_cache(maxsize=8)
def _jitted_encoder(model, mesh, device_size: int | None = None):
    """One compiled encoder per (module, mesh, path): a second dataset (the test split) reuses
    it (the device path compiles once per input image size)."""
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
    """Decode + preprocess `indices`, zero-padded to `plan.batch` rows: float32 [batch, S, S, 3]
    (device path: the decoded uint8 [batch, H, W, 3], preprocessed by the encoder)."""
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
    return {"model": type(model).__name__, "arch": repr(arch) if arch is not None else None}


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
    """Frozen image features of every item of `ds`, cached under `cache_dir`.

    Args:
      ds: a dataset (`labels`, `identity`, `load_batch`; see `calfuse_jax.data.images`).
      model, params: a Linen module with `encode_image` ([B, S, S, 3] -> [B, D]) and its params.
      cache_dir, weights_id: the cache's root (shared by all runs); `weights_id(checkpoint)`.
      image_size, mesh: S (default `model.image_size`); a `data` mesh (default all devices).
      batch_size: images per encoder call (rounded up to a multiple of the device count).
      compute_dtype: encoder compute dtype; default `default_compute_dtype()`.
      chunk_size: images per resumable chunk file (default about 4096, a multiple of the batch).
      num_workers: host threads decoding/preprocessing ahead of the device (default: the cores
        this process may use, `default_workers()`).
      preprocess: `(images, image_size) -> float32 [B, S, S, 3]`; default `clip.preprocess`.
      preprocess_path: "host" (threads run `preprocess`), "device" (uint8 images to the device,
        `preprocess.device_preprocess` in the encoder; needs `ds.fixed_size`, equal pixels) or
        "auto" (device when `ds.fixed_size` and no custom `preprocess`). Part of the key.

    Returns:
      features float32 [N, D] (not normalised) and labels int64 [N] (== `ds.labels`).
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
        on_device = None if preprocess else image_size  # None: float pixels from the host
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
    """One process at a time checks and fills the cache entry `folder` (`entry_lock`). In a
    multi-process run process 0 holds the lock for all: the others start once it has it."""
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
    """Runs the encoder over every chunk without a finished file; returns float32 [N, D]."""
    from tqdm.auto import tqdm

    total, batch = len(ds), plan.batch
    bounds = [(s, min(s + plan.chunk, total)) for s in range(0, total, plan.chunk)]
    done = {i: load_chunk(chunk_dir, s, e) for i, (s, e) in enumerate(bounds)}
    done = {i: a for i, a in done.items() if a is not None}
    todo = [i for i in range(len(bounds)) if i not in done]
    initial = sum(len(a) for a in done.values())
    bar = tqdm(
        total=total, initial=initial, unit="img", desc="image features", disable=not progress
    )
    if todo:
        jobs = [(i, s) for i in todo for s in range(bounds[i][0], bounds[i][1], batch)]
        for i, features in _encode_jobs(ds, jobs, bounds, make_encoder(), plan, bar):
            _check_finite(features, bounds[i][0], ds)
            done[i] = features
            if sharding.is_primary():  # chunk finished: keep it on disk
                save_chunk(chunk_dir, *bounds[i], features)
    bar.close()
    return np.concatenate([done[i] for i in range(len(bounds))]).astype(np.float32)


def _check_finite(features: np.ndarray, start: int, ds) -> None:
    """FeatureCacheError when a chunk [rows, D] starting at row `start` holds NaN/Inf: such
    features are never cached (nor certified), and training on them could only diverge."""
    bad = start + np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad.size:
        raise FeatureCacheError(
            f"the image encoder returned NaN/Inf features for {bad.size} images of "
            f"{ds.identity!r} (first rows {bad[:5].tolist()}); nothing was cached for them. "
            "Check the weights (a damaged or diverged checkpoint gives NaN) and the images."
        )


def _encode_jobs(ds, jobs, bounds, encoder, plan: _Plan, bar):
    """Yields (chunk index, float32 [rows, D]) as chunks finish; jobs are (chunk, batch start).

    Host threads decode and preprocess `workers + 1` batches ahead while the device encodes.
    """
    batch = plan.batch
    with concurrent.futures.ThreadPoolExecutor(plan.workers) as pool:

        def submit(job):
            rows = range(job[1], min(job[1] + batch, bounds[job[0]][1]))
            return pool.submit(_host_batch, ds, rows, plan)

        ahead = collections.deque(submit(job) for job in jobs[: plan.workers + 1])
        next_job = len(ahead)
        parts: list[np.ndarray] = []
        try:
            for i, start in jobs:
                pixels = ahead.popleft().result()
                if next_job < len(jobs):
                    ahead.append(submit(jobs[next_job]))
                    next_job += 1
                rows = min(batch, bounds[i][1] - start)
                parts.append(_fetch(encoder(pixels))[:rows])
                bar.update(rows)
                if start + batch >= bounds[i][1]:
                    yield i, np.concatenate(parts)
                    parts = []
        finally:  # interrupted: drop the queued host work instead of finishing it
            for future in ahead:
                future.cancel()


# ----------------------------------------------------------------------------------------------
# Text features


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

    Each class's prompts `template.format(name)` are encoded and normalised; an ensemble of
    templates averages the normalised embeddings and renormalises (CLIP's prompt ensembling).
    Names are used as given (turn `_` into spaces first with `class_names.prompt_names`).
    """
    names, templates = list(class_names), list(templates)
    if not names or not templates:
        raise ValueError("text_features needs at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}' for the class name: {bad}")
    fields = {
        "kind": "text",
        "weights_id": weights_id,
        **_model_fields(model),
        "version": TEXT_VERSION,
        "names": names,
        "templates": templates,
    }
    folder = Path(cache_dir) / "text" / cache_key(fields)
    with _locked(folder):
        cached = load_verified(folder, ("text.npy",))
        if cached is not None:
            return cached[0]
        text = _encode_text(names, templates, model, params, tokenizer, batch_size)
        if sharding.is_primary():
            write_verified(folder, {"text.npy": text}, fields)
    return text


def _encode_text(names, templates, model, params, tokenizer, batch_size: int) -> np.ndarray:
    """Normalised prompt-ensemble embeddings float32 [C, D] (see `text_features`)."""
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
    text = normalise(embeddings.mean(axis=1)).astype(np.float32)  # [C, D]
    if not np.isfinite(text).all():
        raise FeatureCacheError(
            "the text encoder returned NaN/Inf embeddings; nothing was cached. Check the "
            "weights (a damaged or diverged checkpoint gives NaN)."
        )
    return text


def normalise(x: np.ndarray) -> np.ndarray:
    """x / ||x|| along the last axis (float64 inside for a stable cache)."""
    x64 = np.asarray(x, dtype=np.float64)
    return (x64 / np.linalg.norm(x64, axis=-1, keepdims=True)).astype(np.float32)
