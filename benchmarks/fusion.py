"""Speed of QR/SVD fusion: jitted JAX vs the same formula in NumPy and SciPy.

    python benchmarks/fusion.py [--repeats 20] [--sizes 512 768] [--layers 12]

Reports, per case, the median wall time of `--repeats` runs after compilation (the minimum in
brackets), and the compile time (lower + compile) separately. Cases: `qr_fuse` and `svd_fuse` on
square d x d matrices, and `fuse_params` over a pytree of `--layers` Dense layers (d x d kernel +
bias each; kernels QR-fused, biases kept new). Goal (issue 3): 512^2 QR fusion <= 50 ms on the CPU
after compilation. Timings depend on machine load; the script prints `os.getloadavg()`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from calfuse_jax import fusion


def numpy_mix(q, r_old, w_new, bias):
    p = q.T @ w_new
    diff = np.abs(p - r_old)
    mask = np.minimum(1.0, diff / diff.max() + bias)
    return q @ (mask * p + (1 - mask) * r_old)


def numpy_qr_fuse(w_old, w_new, bias):
    q, r = np.linalg.qr(w_old, mode="complete")
    return numpy_mix(q, r, w_new, bias)


def scipy_qr_fuse(w_old, w_new, bias):
    q, r = scipy.linalg.qr(w_old, mode="full", check_finite=False)
    return numpy_mix(q, r, w_new, bias)


def numpy_svd_fuse(w_old, w_new, bias):
    u, s, vh = np.linalg.svd(w_old, full_matrices=False)  # square: U is already complete
    return numpy_mix(u, s[:, None] * vh, w_new, bias)


def median_ms(fn, repeats: int) -> float:
    """Median wall time in ms; also records the minimum (less sensitive to a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    MINIMA.append(1000 * min(times))
    return 1000 * statistics.median(times)


MINIMA: list[float] = []  # minimum of the last median_ms call, printed in brackets


def timed(fn, repeats: int) -> str:
    median = median_ms(fn, repeats)
    return f"{median:8.2f} ms [min {MINIMA[-1]:7.2f}]"


def compile_ms(jitted, *args) -> float:
    start = time.perf_counter()
    jitted.lower(*args).compile()
    return 1000 * (time.perf_counter() - start)


def bench_matrix(name, jax_fn, references, size: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    w_old = rng.normal(size=(size, size)).astype(np.float32) / np.sqrt(size)
    w_new = (w_old + 0.1 * rng.normal(size=(size, size)) / np.sqrt(size)).astype(np.float32)
    old, new, bias = jnp.asarray(w_old), jnp.asarray(w_new), jnp.float32(0.6)
    jitted = jax.jit(jax_fn)
    compile_time = compile_ms(jitted, old, new, bias)
    jitted(old, new, bias).block_until_ready()
    row = f"{name:9s} {size:4d}^2  jax {timed(lambda: jitted(old, new, bias), repeats)}"
    row += f"  (compile {compile_time:6.1f} ms)"
    for ref_name, ref in references:
        row += f"  {ref_name} {timed(lambda ref=ref: ref(w_old, w_new, 0.6), repeats)}"
    print(row, flush=True)


def bench_tree(size: int, layers: int, repeats: int) -> None:
    rng = np.random.default_rng(1)

    def tree(scale):
        return {
            f"layer_{i}": {
                "kernel": jnp.asarray(rng.normal(size=(size, size)) * scale, jnp.float32),
                "bias": jnp.asarray(rng.normal(size=size), jnp.float32),
            }
            for i in range(layers)
        }

    old, new = tree(1.0), tree(1.0)
    rules = ((".*/kernel", "qr"),)
    start = time.perf_counter()
    jax.block_until_ready(fusion.fuse_params(old, new, rules, 0.6))  # trace + compile + run
    first = 1000 * (time.perf_counter() - start)
    steady = timed(lambda: fusion.fuse_params(old, new, rules, 0.6), repeats)
    old_np = [np.asarray(old[k]["kernel"]).T for k in old]
    new_np = [np.asarray(new[k]["kernel"]).T for k in new]
    numpy_time = timed(
        lambda: [numpy_qr_fuse(a, b, 0.6) for a, b in zip(old_np, new_np, strict=True)], repeats
    )
    print(
        f"fuse_params {layers} x {size}^2  jax {steady}  (first call incl. compile "
        f"{first:7.1f} ms)  numpy loop {numpy_time}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tree-size", type=int, default=512)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    print(f"load average before: {os.getloadavg()}")
    qr_refs = [("numpy", numpy_qr_fuse), ("scipy", scipy_qr_fuse)]
    for size in args.sizes:
        bench_matrix("qr_fuse", fusion.qr_fuse, qr_refs, size, args.repeats)
        bench_matrix("svd_fuse", fusion.svd_fuse, [("numpy", numpy_svd_fuse)], size, args.repeats)
    bench_tree(args.tree_size, args.layers, args.repeats)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
