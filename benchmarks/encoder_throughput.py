"""Image-tower throughput: our jitted Flax CLIP vs PyTorch CLIPVisionModelWithProjection.

    python benchmarks/encoder_throughput.py --variants ViT-B/16 ViT-B/32 --batch 8 --repeats 3

Random weights, same batch, same machine, one process. Prints images/s of both, their ratio, our
compile time, and the achieved FLOP rate against this machine's measured large-matmul rate
(jitted jnp.matmul, same backend and dtype). ViT-B/16 at 224^2 is about 17.6 G multiply-adds per
image. The machine may be shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from calfuse_jax.models.clip import CLIP, VARIANTS, CLIPArch, param_shapes
from calfuse_jax.models.convert import config_from_arch


def vision_macs(arch: CLIPArch) -> float:
    """Multiply-adds of one image through the image tower + projection (matmuls only)."""
    patches = (arch.image_size // arch.patch_size) ** 2
    tokens, width = patches + 1, arch.vision_width
    per_layer = 4 * tokens * width**2 + 2 * tokens**2 * width + 2 * tokens * width * arch.vision_mlp
    patch_embed = patches * arch.patch_size**2 * 3 * width
    return arch.vision_layers * per_layer + patch_embed + width * arch.embed_dim


def random_vision_params(arch: CLIPArch, seed: int = 0) -> dict:
    """Random image-tower params without compiling an init (speed does not depend on values)."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(arch)
    tower = {k: shapes[k] for k in ("vision_model", "visual_projection")}
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), jnp.float32), tower)


def interleaved(fns: dict, repeats: int) -> dict:
    """Best and median seconds per callable, calling them round-robin after one warm-up each, so
    that every callable sees the same (shared-machine) load."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), float(np.median(t))) for name, t in times.items()}


def matmul_fn(dtype, size: int = 2048):
    """A jitted [size, size] @ [size, size] matmul (the machine's practical FLOP ceiling)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), dtype)
    matmul = jax.jit(jnp.matmul)
    return lambda: matmul(a, a).block_until_ready(), 2 * size**3


def ours_fn(arch: CLIPArch, batch: int, dtype):
    """(callable, compile seconds, XLA flop count) for our jitted image tower."""
    model = CLIP(arch, dtype=dtype)
    variables = {"params": random_vision_params(arch)}
    pixels = jnp.asarray(
        np.random.default_rng(1).normal(size=(batch, arch.image_size, arch.image_size, 3)),
        jnp.float32,
    )
    encode = jax.jit(functools.partial(model.apply, method=model.encode_image))
    start = time.perf_counter()
    compiled = encode.lower(variables, pixels).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    run = lambda: compiled(variables, pixels).block_until_ready()
    return run, compile_s, (cost or {}).get("flops")


def torch_fn(arch: CLIPArch, batch: int):
    """Callable running transformers' PyTorch CLIPVisionModelWithProjection, or None."""
    try:
        import torch
        from transformers import CLIPVisionModelWithProjection
    except ImportError:
        return None
    config = config_from_arch(arch).vision_config  # the same HF config our loader reads
    model = CLIPVisionModelWithProjection(config).eval()
    pixels = torch.randn(batch, 3, arch.image_size, arch.image_size)

    def run():
        with torch.inference_mode():
            model(pixel_values=pixels).image_embeds.sum().item()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["ViT-B/16", "ViT-B/32"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}, dtype {args.dtype}")
    print(f"load average before: {os.getloadavg()}  (timings: best / median of the repeats)")
    matmul, matmul_flops = matmul_fn(dtype)
    for name in args.variants:
        arch = VARIANTS[name]
        ours, compile_s, xla_flops = ours_fn(arch, args.batch, dtype)
        fns = {"matmul": matmul, "ours": ours}
        if not args.skip_torch and args.dtype == "float32":
            theirs = torch_fn(arch, args.batch)
            if theirs is not None:
                fns["torch"] = theirs
        seconds = interleaved(fns, args.repeats)
        peak = matmul_flops / seconds["matmul"][0]
        rate = {k: (args.batch / v[0], args.batch / v[1]) for k, v in seconds.items()}
        achieved = rate["ours"][0] * 2 * vision_macs(arch)
        print(
            f"{name} batch {args.batch}: ours {rate['ours'][0]:.2f} / {rate['ours'][1]:.2f} img/s "
            f"(compile {compile_s:.1f} s; {vision_macs(arch) / 1e9:.2f} GMAC/img, XLA counts "
            f"{(xla_flops or 0) / args.batch / 1e9:.1f} GFLOP/img)"
        )
        print(
            f"  FLOP rate {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of the "
            f"2048^3 jnp matmul's {peak / 1e9:.1f} GFLOP/s (best vs best)"
        )
        if "torch" in rate:
            print(
                f"  torch {rate['torch'][0]:.2f} / {rate['torch'][1]:.2f} img/s; ours/torch "
                f"{rate['ours'][0] / rate['torch'][0]:.2f}x (best), "
                f"{rate['ours'][1] / rate['torch'][1]:.2f}x (median)",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
