"""Feature extraction per stage: images/s and MFU, for JPEG files and CIFAR-shaped arrays.

    python benchmarks/feature_cache.py --variant tiny224 --images 512 --batch-size 64
    python benchmarks/feature_cache.py --variant ViT-B/16 --source cifar --images 4096 \\
        --batch-size 256 --json out.json

Random-weight CLIP image tower (speed does not depend on the values), one batch size. Stages:
  host decode       JPEG: decode + CLIP preprocessing on the pipeline's threads (host path);
                    CIFAR: gathering uint8 [B, 32, 32, 3] (what the device path sends)
  device preprocess `preprocess.device_preprocess` alone, uint8 already on the device
  encoder           the jitted, sharded encoder alone on float pixels already on the device
  device prep+enc   the device path's one program (uint8 in, features out), on the device
  end to end        `features.image_features` into a fresh cache (decode, transfer, encode,
                    chunk files, verified merge), after a warm-up run so compiles are excluded;
                    CIFAR: once per path (device, host)
MFU = XLA's FLOP count of the compiled stage x its rate / the peak of the devices
(`peaks.peak_flops`: a table by device kind; elsewhere a measured matmul). The pipeline keeps
up when end to end is close to min(host decode, device stage).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from encoder_throughput import random_vision_params  # noqa: E402
from peaks import peak_flops, xla_flops  # noqa: E402

from calfuse_jax import features, sharding  # noqa: E402
from calfuse_jax.data.images import ArrayDataset, FileDataset, folder_dataset  # noqa: E402
from calfuse_jax.models.clip import CLIP, VARIANTS  # noqa: E402
from calfuse_jax.preprocess import device_preprocess  # noqa: E402

# tiny at 224 x 224 (patch 32): CIFAR's 32 x 32 is upsampled as for a real CLIP, in seconds.
EXTRA_VARIANTS = {"tiny224": dataclasses.replace(VARIANTS["tiny"], image_size=224, patch_size=32)}


def write_images(folder: str, count: int, size=(500, 375), classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    for i in range(count):
        path = os.path.join(folder, f"c{i % classes}", f"{i:06d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Smooth content (upsampled noise), like a photo, so JPEG sizes are realistic.
        image = Image.fromarray(np.roll(base, i, axis=1)).resize(size, Image.Resampling.BILINEAR)
        image.save(path, quality=90)


def cifar_like(count: int, classes: int = 100) -> ArrayDataset:
    """uint8 [count, 32, 32, 3], smooth like photos (4x upsampled noise plus grain)."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8).repeat(4, 1).repeat(4, 2)
    grain = rng.integers(-8, 9, coarse.shape)
    images = np.clip(coarse.astype(np.int16) + grain, 0, 255).astype(np.uint8)
    return ArrayDataset(images, np.arange(count) % classes, [f"c{i}" for i in range(classes)],
                        description=f"bench-cifar-like/{count}")  # fmt: skip


def time_host(ds, on_device: bool, image_size: int, batch: int, workers: int) -> float:
    """img/s of the pipeline's host work (`features._host_batch`) on its thread pool."""
    import concurrent.futures

    from calfuse_jax.preprocess import preprocess

    plan = features._Plan(None if on_device else preprocess, image_size, batch, batch, workers)
    starts = range(0, len(ds), batch)
    job = lambda s: features._host_batch(ds, range(s, min(s + batch, len(ds))), plan)  # noqa: E731
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(job, starts))
    return len(ds) / (time.perf_counter() - start)


def time_compiled(jitted, args: tuple, batch: int, repeats: int) -> tuple[float, float]:
    """(img/s, XLA FLOP per image) of `jitted` on device-resident `args` (compile excluded)."""
    compiled = jitted.lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = compiled(*args)
    jax.block_until_ready(out)
    return batch * repeats / (time.perf_counter() - start), xla_flops(compiled) / batch


def device_stages(model, params, raw: np.ndarray, size: int, repeats: int, dtype) -> dict:
    """{stage: (img/s, FLOP/img)} of the device stages on one batch `raw` uint8 [B, H, W, 3]."""
    mesh = sharding.make_mesh()
    model = features.with_compute_dtype(model, dtype)
    on_mesh = sharding.replicate(params, mesh)
    raw_dev = sharding.shard_batch(raw, mesh)
    prep = jax.jit(
        functools.partial(device_preprocess, image_size=size),
        out_shardings=sharding.data_sharding(mesh),
    )
    pixels = jax.block_until_ready(prep(raw_dev))
    batch, stages = len(raw), {}
    stages["device preprocess"] = time_compiled(prep, (raw_dev,), batch, repeats)
    encoder = features._jitted_encoder(model, mesh)
    stages["encoder"] = time_compiled(encoder, (on_mesh, pixels), batch, repeats)
    fused = features._jitted_encoder(model, mesh, size)
    stages["device prep+enc"] = time_compiled(fused, (on_mesh, raw_dev), batch, repeats)
    return stages


def end_to_end(ds, model, params, path: str, batch: int, workers: int, tmp: str) -> float:
    """img/s of `features.image_features` into a fresh cache, after a same-shape warm-up."""
    common = dict(weights_id="bench", batch_size=batch, progress=False, num_workers=workers,
                  preprocess_path=path)  # fmt: skip
    first = np.arange(min(batch, len(ds)))
    if isinstance(ds, FileDataset):
        warm = FileDataset(ds.root, [ds.files[i] for i in first], ds.labels[first],
                           ds.class_names, description="warm-up")  # fmt: skip
    else:
        warm = ArrayDataset(ds.images[first], ds.labels[first], ds.class_names, description="w")
    features.image_features(warm, model, params, cache_dir=os.path.join(tmp, f"w{path}"), **common)
    start = time.perf_counter()
    features.image_features(ds, model, params, cache_dir=os.path.join(tmp, f"c{path}"), **common)
    return len(ds) / (time.perf_counter() - start)


def measure(args, tmp: str) -> dict:
    """{stage: {"img_s": ..., "gflop_per_img": ..., "mfu": ...}} for `args.source`."""
    arch = EXTRA_VARIANTS.get(args.variant) or VARIANTS[args.variant]
    model, params = CLIP(arch), random_vision_params(arch)
    size, batch = arch.image_size, sharding.padded_size(args.batch_size, sharding.make_mesh())
    dtype = features.default_compute_dtype() if args.dtype == "auto" else jnp.dtype(args.dtype)
    if args.source == "jpeg":
        write_images(os.path.join(tmp, "images"), args.images)
        ds, raw = folder_dataset(os.path.join(tmp, "images")), None
    else:
        ds = cifar_like(args.images)
        raw = ds.images[np.arange(batch) % len(ds)]
    rates = {"host decode": (time_host(ds, raw is not None, size, batch, args.workers), None)}
    if raw is None:  # the device stages take uint8 images of one size: use the crops
        from calfuse_jax.preprocess import resize_and_crop

        raw = np.stack([resize_and_crop(ds.load(i % len(ds)), size) for i in range(batch)])
    rates.update(device_stages(model, params, raw, size, args.repeats, dtype))
    paths = ("host",) if args.source == "jpeg" else ("device", "host")
    for path in paths:
        rate = end_to_end(ds, model, params, path, batch, args.workers, tmp)
        rates[f"end to end ({path})"] = (rate, None)
    peak, peak_source = peak_flops(dtype)
    devices = jax.device_count()
    table = {}
    for stage, (rate, flop) in rates.items():
        mfu = None if flop is None or not np.isfinite(flop) else rate * flop / (peak * devices)
        table[stage] = {"img_s": rate, "gflop_per_img": None if flop is None else flop / 1e9,
                        "mfu": mfu}  # fmt: skip
    info = {"variant": args.variant, "source": args.source, "image_size": size, "batch": batch,
            "images": args.images, "dtype": jnp.dtype(dtype).name, "workers": args.workers,
            "devices": f"{devices} x {jax.devices()[0].device_kind}", "peak_flops": peak,
            "peak_source": peak_source, "load": os.getloadavg()[0]}  # fmt: skip
    return {"info": info, "stages": table}


def report(result: dict) -> None:
    info = result["info"]
    print(" ".join(f"{k}={v}" for k, v in info.items() if k not in ("peak_flops",)))
    print(f"peak {info['peak_flops'] / 1e12:.3g} TFLOP/s per device ({info['peak_source']})")
    print(f"{'stage':<22}{'img/s':>11}{'GFLOP/img':>11}{'MFU':>8}")
    for stage, row in result["stages"].items():
        flop = "" if row["gflop_per_img"] is None else f"{row['gflop_per_img']:.2f}"
        mfu = "" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"{stage:<22}{row['img_s']:>11.1f}{flop:>11}{mfu:>8}")
    stages = result["stages"]
    device = stages["device prep+enc" if info["source"] == "cifar" else "encoder"]["img_s"]
    best = min(stages["host decode"]["img_s"], device)
    for stage in (s for s in stages if s.startswith("end to end")):
        print(f"{stage}: {stages[stage]['img_s'] / best:.0%} of min(host decode, device)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="tiny224", help="tiny224 or a key of clip.VARIANTS")
    parser.add_argument("--source", choices=["jpeg", "cifar"], default="jpeg")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=features.default_workers())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, tmp)
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
