"""Peak FLOP rates for MFU: a table by device kind, or a measured matmul rate elsewhere (CPU).

    from peaks import peak_flops, xla_flops
    peak, source = peak_flops(jnp.bfloat16)     # FLOP/s of one device, and where it came from

MFU = achieved FLOP/s (XLA's FLOP count of the compiled program x calls per second) over the
peak of the devices used. Table values are dense (no sparsity) vendor figures per chip; f32 on
NVIDIA is the CUDA-core rate (XLA may use TF32 tensor cores for f32 matmuls, which can then
exceed it), f32 on TPU runs as one bf16 pass at DEFAULT precision, so it takes the bf16 peak.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# device_kind substring (first match wins, most specific first) -> (bf16, f32) FLOP/s per chip
PEAKS = (
    ("H100 PCIe", (756e12, 51e12)),
    ("H100", (989e12, 67e12)),  # SXM
    ("H200", (989e12, 67e12)),
    ("A100", (312e12, 19.5e12)),
    ("TPU v4", (275e12, 275e12)),
    ("TPU v5 lite", (197e12, 197e12)),  # v5e
    ("TPU v5e", (197e12, 197e12)),
    ("TPU v5p", (459e12, 459e12)),
    ("TPU v5", (459e12, 459e12)),
)


def measured_matmul_flops(dtype, size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a jitted [size, size] @ [size, size] on the default device (best of repeats);
    the practical ceiling on a CPU, as benchmarks/encoder_throughput.py measures it."""
    import time

    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device for `dtype`, its source: the table row or 'measured matmul')."""
    kind = jax.devices()[0].device_kind
    for name, (bf16, f32) in PEAKS:
        if name.lower() in kind.lower():
            peak = bf16 if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else f32
            return peak, f"table: {name} {jnp.dtype(dtype).name}"
    return measured_matmul_flops(dtype), f"measured 2048^3 {jnp.dtype(dtype).name} matmul ({kind})"


def xla_flops(compiled) -> float:
    """XLA's FLOP count of a compiled program (`jax.jit(f).lower(...).compile()`), NaN if none."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", float("nan")))
