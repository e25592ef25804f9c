"""Runs a benchmark script under `jax.profiler` and writes the trace into a folder.

    python benchmarks/trace.py OUT_DIR benchmarks/continual.py --seeds 0 --epochs 2

The trace (`OUT_DIR/plugins/profile/<run>/*.xplane.pb`, plus a Perfetto `*.trace.json.gz`)
opens in TensorBoard's profile plugin, XProf or ui.perfetto.dev. The script runs as __main__
with the arguments after its path, as if started directly.
"""

from __future__ import annotations

import os
import runpy
import sys

import jax


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    out, script, *rest = sys.argv[1:]
    os.makedirs(out, exist_ok=True)
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    with jax.profiler.trace(out, create_perfetto_trace=True):
        runpy.run_path(script, run_name="__main__")
    print(f"jax.profiler trace written under {out}")


if __name__ == "__main__":
    main()
