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


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_flops(dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted [size, size] @ [size, size] matmul (the machine's practical ceiling)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), dtype)
    matmul = jax.jit(jnp.matmul)
    seconds = timed(lambda: matmul(a, a).block_until_ready(), repeats)
    return 2 * size**3 / seconds


def bench_ours(arch: CLIPArch, batch: int, repeats: int, dtype) -> dict:
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
    seconds = timed(lambda: compiled(variables, pixels).block_until_ready(), repeats)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"images_s": batch / seconds, "compile_s": compile_s, "xla_flops": cost.get("flops")}


def bench_torch(arch: CLIPArch, batch: int, repeats: int) -> float | None:
    try:
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    except ImportError:
        return None
    config = CLIPVisionConfig(
        hidden_size=arch.vision_width,
        intermediate_size=arch.vision_mlp,
        projection_dim=arch.embed_dim,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        hidden_act=arch.vision_act,
    )
    model = CLIPVisionModelWithProjection(config).eval()
    pixels = torch.randn(batch, 3, arch.image_size, arch.image_size)

    def run():
        with torch.inference_mode():
            model(pixel_values=pixels).image_embeds.sum().item()

    return batch / timed(run, repeats)


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
    print(f"load average before: {os.getloadavg()}")
    peak = matmul_flops(dtype)
    print(f"large matmul (2048^3, jitted jnp): {peak / 1e9:.1f} GFLOP/s")
    for name in args.variants:
        arch = VARIANTS[name]
        ours = bench_ours(arch, args.batch, args.repeats, dtype)
        flops_per_image = 2 * vision_macs(arch)
        achieved = ours["images_s"] * flops_per_image
        line = (
            f"{name} batch {args.batch}: ours {ours['images_s']:.2f} img/s "
            f"(compile {ours['compile_s']:.1f} s, {vision_macs(arch) / 1e9:.2f} GMAC/img, "
            f"{achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of matmul; XLA counts "
            f"{(ours['xla_flops'] or 0) / args.batch / 1e9:.1f} GFLOP/img)"
        )
        if not args.skip_torch and args.dtype == "float32":
            theirs = bench_torch(arch, args.batch, args.repeats)
            if theirs:
                line += f" | torch {theirs:.2f} img/s | ours/torch {ours['images_s'] / theirs:.2f}x"
        print(line, flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
