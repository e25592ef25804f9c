"""Speed of a whole continual run on CIFAR-100-sized synthetic features.

    python benchmarks/continual.py [--tasks 10] [--classes 100] [--dim 512] [--epochs 15]
                                   [--cpu-devices 2] [--method ranpac] [--seeds 0,1,2]

10 tasks x 10 classes, 512-d features, 50k train / 10k test rows, 15 epochs per task, batch 128:
the same work as a CalFuse run on CIFAR-100 B0 Inc10 after feature extraction. Reports wall time
split into compilation (XLA backend compiles, summed from JAX's monitoring events) and the rest,
plus per-phase figures (training steps, checkpoints) and peak memory (the device's peak bytes in
use where JAX reports it, and the process's peak RSS), XLA's FLOP count of one training step
and the FLOP rate the training loops reach. `--seeds 0,1,2` runs the seeds one after another in
one process (they share the compiled programs). Goal on a 2-core CPU: <= 60 s.
`--method ranpac` measures RanPAC at `--config.ranpac.dim` M = 10,000 (`--ranpac-dim`).
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and "--cpu-devices" in sys.argv:
    # Split the CPU into N XLA devices (before jax is imported): the batch is then sharded over
    # N threads by the same Mesh code that shards it over GPUs.
    count = sys.argv[sys.argv.index("--cpu-devices") + 1]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"

import jax  # noqa: E402

from calfuse_jax import train  # noqa: E402
from calfuse_jax.config import method_config  # noqa: E402
from calfuse_jax.continual import run_continual  # noqa: E402
from calfuse_jax.data.synthetic import make_synthetic_stream  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENT = "/jax/core/compile/tracing_duration"


def folder_bytes(folder: Path) -> int:
    """Bytes on disk under `folder` (allocated blocks, as `du` counts them)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def capture_epoch_shapes(seen: list) -> None:
    """Records the abstract arguments of the first compiled epoch (for XLA's FLOP count)."""
    compiled = train.epoch_fn

    def capturing(*settings, **options):
        run_epoch = compiled(*settings, **options)

        def call(*args):
            if not seen:
                abstract = jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), args
                )
                seen.append((run_epoch, abstract))
            return run_epoch(*args)

        return call

    train.epoch_fn = capturing


def flops_per_step(seen: list) -> float:
    """XLA's FLOP count of one epoch program, whose loop body (one step) it counts once."""
    if not seen:
        return float("nan")
    run_epoch, abstract = seen[0]
    cost = run_epoch.lower(*abstract).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--method", default="calfuse")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, run one after another")
    parser.add_argument("--ranpac-dim", type=int, default=10_000, help="RanPAC's M")
    parser.add_argument("--cpu-devices", type=int, default=1, help="fake XLA CPU devices")
    parser.add_argument("--workdir", default=None, help="run folder to keep (default: a temp one)")
    args = parser.parse_args()

    durations: collections.Counter = collections.Counter()

    def listen(event: str, seconds: float, **kwargs) -> None:
        durations[event] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    seen: list = []
    capture_epoch_shapes(seen)
    per_class = args.classes // args.tasks
    stream, text = make_synthetic_stream(
        num_classes=args.classes, dim=args.dim, train_per_class=50_000 // args.classes,
        test_per_class=10_000 // args.classes, initial=per_class, increment=per_class, seed=0,
        close_pairs=args.classes // 10,
    )  # fmt: skip
    config = method_config()
    config.method, config.ranpac.dim = args.method, args.ranpac_dim
    config.train.epochs = args.epochs
    config.continual.initial = config.continual.increment = per_class
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        started, cpu_started = time.perf_counter(), os.times()
        for seed in seeds:
            config.seed = seed
            folder = workdir / f"seed_{seed}" if len(seeds) > 1 else workdir
            result = run_continual(stream, text, config, folder, progress=False)
        wall, cpu_ended = time.perf_counter() - started, os.times()
        checkpoint_bytes = folder_bytes(workdir)
    # CPU seconds used by this process: on a shared machine, wall time also counts waiting.
    cpu = (cpu_ended.user + cpu_ended.system) - (cpu_started.user + cpu_started.system)
    compile_s = durations[COMPILE_EVENT]
    train_s = sum(row["train_seconds"] for row in result.rows)
    steps = sum(row["steps"] for row in result.rows)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, {os.cpu_count()} cores, "
          f"load average {load}")  # fmt: skip
    print(f"data: {len(stream.train_labels)} train / {len(stream.test_labels)} test, "
          f"{args.dim}-d, {args.tasks} tasks, {args.epochs} epochs, {steps} steps, "
          f"{len(seeds)} seed(s)")  # fmt: skip
    tracing = durations[TRACE_EVENT]
    print(f"wall {wall:.1f} s = compile {compile_s:.1f} s (+ tracing {tracing:.1f} s)"
          f" + run {wall - compile_s - tracing:.1f} s")  # fmt: skip
    print(f"last seed: training loops {train_s:.1f} s ({1e3 * train_s / max(steps, 1):.2f} "
          f"ms/step incl. compile); stats, fusion, eval, checkpoints "
          f"{wall / len(seeds) - train_s:.1f} s (per seed, average)")  # fmt: skip
    flops = flops_per_step(seen)
    if steps and train_s:
        print(f"XLA: {flops / 1e6:.0f} MFLOP per step -> {flops * steps / train_s / 1e9:.1f} "
              "GFLOP/s in the last seed's training loops")  # fmt: skip
    print(f"process CPU time {cpu:.1f} s (user + system, all threads)")
    print(f"checkpoints folder {checkpoint_bytes / 2**20:.1f} MiB on disk")
    device_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    device = f"device peak {device_peak / 2**30:.2f} GiB, " if device_peak else ""
    print(f"peak memory: {device}process peak RSS {rss:.2f} GiB")
    print("summary:", {k: round(v, 2) for k, v in result.summary.items()})


if __name__ == "__main__":
    main()
