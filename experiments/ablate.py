"""Runs a grid of configs x seeds and writes one comparison table and plot.

    python -m experiments.ablate --config cifar100 --grid pseudo.beta=1,2 --seeds 0,1

Each cell is an ordinary results folder `<workdir>/<cell name>/`; the grid writes ablation.md,
ablation.csv, comparison.png, accuracy_curve.png and grid.json into `<workdir>`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
from collections.abc import Sequence

import ml_collections
import numpy as np

from calfuse_jax import rundir
from calfuse_jax.config import method_config, resolve_method
from calfuse_jax.files import atomic_write
from calfuse_jax.sharding import barrier, is_primary
from experiments import cli, results
from experiments.configs import apply_overrides
from experiments.grids import Axis, Cell, GridError, combine, expand, parse_grid, preset, short_key
from experiments.pipeline import prepare, with_data_fields
from experiments.run import run_experiments

log = logging.getLogger("experiments.ablate")

TABLE_METRICS = ("avg", "last", "forgetting", "bwt")
# Keys a grid may not vary: seeds are the repetitions of a cell, and one cache serves every cell.
FORBIDDEN_KEYS = ("seeds", "seed", "cache_dir", "progress")


@dataclasses.dataclass
class CellResult:
    """One finished cell of a grid; `skipped` when an earlier run had finished it."""

    cell: Cell
    workdir: pathlib.Path
    summary: dict
    skipped: bool


def cell_config(
    base: ml_collections.ConfigDict,
    cell: Cell,
    seeds: str | None = None,
    cell_outputs: bool = True,
) -> ml_collections.ConfigDict:
    """`base` with the cell's settings (and `seeds`, and no plots unless `cell_outputs`)."""
    extra = [f"seeds={seeds}"] if seeds else []
    if not cell_outputs:
        extra += ["outputs.plots=false", "outputs.tensorboard=false"]
    return apply_overrides(base, [*cell.overrides, *extra])


def check_axes(base: ml_collections.ConfigDict, axes: Sequence[Axis]) -> list[Cell]:
    """Expands `axes` into cells and checks every cell's config before anything runs."""
    for key, _ in axes:
        if key in FORBIDDEN_KEYS:
            hint = "use --seeds" if key.startswith("seed") else "set it with --config.KEY=VALUE"
            raise GridError(f"{key!r} cannot be a grid key; {hint}")
    cells = expand(axes)
    for cell in cells:
        cell_config(base, cell)  # raises ConfigError naming a bad key or value
    return cells


def finished_summary(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> dict | None:
    """The summary of a finished run of `config` in `workdir`, or None."""
    old = rundir.readable_json(workdir / rundir.CONFIG_FILE)
    summary = rundir.readable_json(workdir / "summary.json")
    if old is None or summary is None:
        return None
    return None if rundir.differences(old, resolve_method(config).to_dict(), ("seed",)) else summary


def data_key(config: ml_collections.ConfigDict) -> str:
    """What `pipeline.prepare` depends on: every field outside `method_config()`, plus the task
    split (`continual.*`), but `rundir.RESUME_SAFE`. Cells of one key share their features."""
    method = {k for k in rundir.flat(method_config().to_dict()) if not k.startswith("continual.")}
    ignore = {*rundir.RESUME_SAFE, "seed", "seeds", "name", *method}
    flat = rundir.flat(rundir.jsonable(config.to_dict()))
    return json.dumps({k: v for k, v in sorted(flat.items()) if k not in ignore}, sort_keys=True)


def run_cells(
    base: ml_collections.ConfigDict,
    cells: Sequence[Cell],
    workdir: str | pathlib.Path,
    seeds: str | None = None,
    overwrite: bool = False,
    cell_outputs: bool = False,
) -> list[CellResult]:
    """Runs (or skips, when finished) every cell into `workdir/<cell.name>`; returns them in grid
    order. Cells of one `data_key` share their features and run as one `run_experiments`."""
    workdir = pathlib.Path(workdir)
    done, batches = {}, {}  # batches: data key -> indices of the cells to run
    for index, cell in enumerate(cells):
        config = with_data_fields(cell_config(base, cell, seeds, cell_outputs))
        folder = workdir / cell.name
        summary = None if overwrite else finished_summary(folder, config)
        if summary is not None:
            log.info("[%d/%d] %s: finished earlier, skipped", index + 1, len(cells), cell.label)
            done[index] = CellResult(cell, folder, summary, skipped=True)
        else:
            log.info("[%d/%d] %s -> %s", index + 1, len(cells), cell.label, folder)
            batches.setdefault(data_key(config), []).append((index, config, folder))
    for batch in batches.values():  # features load (or encode) once per dataset/split/model
        items = [(config, folder) for _, config, folder in batch]
        summaries = run_experiments(items, overwrite, prepare(items[0][0]))
        for (index, _, folder), summary in zip(batch, summaries, strict=True):
            done[index] = CellResult(cells[index], folder, summary, skipped=False)
    return [done[index] for index in range(len(cells))]


def _seed_count(summary: dict) -> int:
    return len(summary.get("seeds") or [summary.get("seed")])


def markdown_table(cells: Sequence[CellResult]) -> str:
    """A Markdown table, one column per varied grid key, metrics as `mean ± std`."""
    varied = cells[0].cell.varied if cells else ()
    titles = [short_key(k) for k in varied] or ["run"]
    titles += [results.METRIC_TITLES[k] for k in TABLE_METRICS] + ["seeds"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for result in cells:
        settings = [result.cell.values[k] for k in varied] or [result.cell.label]
        metrics = [results.format_metric(result.summary, k) for k in TABLE_METRICS]
        line = [*settings, *metrics, str(_seed_count(result.summary))]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def _metric(cells: Sequence[CellResult], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(means, stds) of one metric over cells; NaN where a cell lacks it, std 0 for one seed."""
    means = [r.summary.get(key) for r in cells]
    stds = [r.summary.get(f"{key}_std") for r in cells]
    return (np.array([np.nan if m is None else float(m) for m in means]),
            np.array([0.0 if s is None else float(s) for s in stds]))  # fmt: skip


def plot_comparison(cells: Sequence[CellResult], path: pathlib.Path, title: str = "") -> None:
    """Horizontal bars of Avg and Last per cell (± std), the first cell on top; the axis starts
    at the decade below the lowest bar, so the differences stay visible."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    y = np.arange(len(cells))[::-1]  # first cell on top
    height = 0.38
    lowest = min(np.nanmin(m - s) for m, s in (_metric(cells, k) for k in ("avg", "last")))
    start = max(0.0, 10 * np.floor((lowest - 2) / 10)) if np.isfinite(lowest) else 0.0
    fig = Figure(figsize=(7.5, 1.2 + 0.42 * len(cells)), dpi=120)
    ax = fig.subplots()
    for offset, key in ((height / 2, "avg"), (-height / 2, "last")):
        means, stds = _metric(cells, key)
        # Each cell in its method's colour (Avg solid, Last hatched); joint's bars dashed.
        styles = [results.method_style(result.cell.label) for result in cells]
        bars = ax.barh(y + offset, means - start, height, left=start, xerr=stds, capsize=2,
                       label=results.METRIC_TITLES[key], hatch="//" if key == "last" else None,
                       color=[st.get("color", f"C{int(key == 'last')}") for st in styles],
                       edgecolor="white")  # fmt: skip
        for bar, st in zip(bars, styles, strict=True):
            if st.get("linestyle") == "--":
                bar.set(fill=False, edgecolor=st["color"], linestyle="--")
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=7, padding=3)
    ax.set_yticks(y)
    ax.set_yticklabels([result.cell.label for result in cells], fontsize=8)
    ax.set_xlim(start, 102)
    ax.set_xlabel(f"accuracy (%), axis from {start:.0f}" if start else "accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or "ablation")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def write_outputs(
    cells: Sequence[CellResult], workdir: str | pathlib.Path, title: str, notes: Sequence[str] = ()
) -> pathlib.Path:
    """ablation.md, ablation.csv, comparison.png and accuracy_curve.png; returns ablation.md."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    columns = [f"{k}{s}" for k in TABLE_METRICS for s in ("", "_std")]
    rows = [  # one per cell: its varied settings, each metric and its std, seeds, folder
        {key: r.cell.values[key] for key in r.cell.varied}
        | {c: r.summary.get(c) for c in columns}
        | {"seeds": _seed_count(r.summary), "folder": r.workdir.name}
        for r in cells
    ]
    results.write_csv(workdir / "ablation.csv", rows)
    plot_comparison(cells, workdir / "comparison.png", title)
    curves = [(result.cell.label, result.summary) for result in cells]
    results.plot_accuracy_curves(curves, workdir / "accuracy_curve.png", title=title)
    seeds = sorted({_seed_count(result.summary) for result in cells})
    lines = [f"# {title}", ""]
    lines.append(
        "Accuracy in % on all classes seen so far"
        + (f", mean ± std over {seeds[0]} seeds" if seeds == [seeds[0]] and seeds[0] > 1 else "")
        + ". Forgetting: lower is better; BWT: higher is better."
    )
    lines += ["", *notes, "", markdown_table(cells)]
    lines += ["![comparison](comparison.png)", "", "![accuracy curves](accuracy_curve.png)", ""]
    path = workdir / "ablation.md"
    atomic_write(path, "w", lambda f: f.write("\n".join(lines)))
    return path


def ablate(
    config: ml_collections.ConfigDict,
    axes: Sequence[Axis],
    workdir: str | pathlib.Path,
    seeds: str | None = None,
    overwrite: bool = False,
    title: str = "",
    notes: Sequence[str] = (),
    cell_outputs: bool = False,
) -> list[CellResult]:
    """Runs every cell of `axes` (`(key, values)` pairs, e.g. `preset("method")`) on `config`
    into `workdir/<cell name>`, resuming, and writes the table and plots; returns one
    `CellResult` per cell, in grid order. `seeds` ("0,1,2") overrides every cell's seeds."""
    cells = check_axes(config, axes)
    workdir = pathlib.Path(workdir)
    fixed = ", ".join(f"`{k}={v}`" for k, v in cells[0].values.items() if k not in cells[0].varied)
    record = {
        "config": config.name,
        "seeds": seeds or config.seeds,
        "axes": [[key, list(values)] for key, values in axes],
        "cells": [cell.name for cell in cells],
    }
    lines = [f"Config `{config.name}`" + (f"; fixed in every cell: {fixed}" if fixed else "") + "."]
    with rundir.lock(workdir):  # one process per grid folder: a second one is refused at once
        if is_primary():  # multi-process runs: process 0 writes, every process computes
            rundir.write_json(workdir / "grid.json", record)
        done = run_cells(config, cells, workdir, seeds, overwrite, cell_outputs=cell_outputs)
        if is_primary():
            title = title or f"Ablation on {config.name}"
            log.info("table: %s", write_outputs(done, workdir, title, [*lines, *notes]))
    return done


def default_workdir(config_name: str, preset_name: str | None, specs: Sequence[str],
                    overrides: Sequence[str], config=None) -> pathlib.Path:  # fmt: skip
    """runs/ablate-<config>-<preset or grid>[-<hash of grid and overrides>]."""
    stem, variant = cli.name_parts(config_name, config)
    parts = ("ablate", stem, variant, preset_name or "grid")
    return cli.default_workdir(parts, overrides, extra=sorted(specs))


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status, as `experiments.run`'s (`cli.main_guard`)."""
    parser = cli.command_parser(
        "ablate",
        "Run every combination of a grid (x seeds) on one benchmark and write one "
        "table (ablation.md, ablation.csv) and one comparison plot. Base-config overrides: "
        "--config.KEY=VALUE.",
    )
    parser.add_argument("--preset", help="a preset grid: method | calfuse_ablation")
    parser.add_argument(
        "--grid",
        nargs="+",
        default=[],
        metavar="KEY=V1,V2",
        help="grid axes; with --preset, replaces the preset's axis of that key",
    )
    parser.add_argument("--seeds", help="seeds of every cell, e.g. 0,1,2 (default: config.seeds)")
    parser.add_argument("--workdir", help="grid folder (default: runs/ablate-<config>-<grid>)")
    parser.add_argument("--overwrite", action="store_true", help="rerun finished cells too")
    parser.add_argument("--title", default="", help="table and plot title")
    parser.add_argument(
        "--cell-outputs",
        action="store_true",
        help="also write each cell's own plots and TensorBoard files (off by default: slower)",
    )
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not keep compiled XLA programs in <cache_dir>/xla between cells and seeds",
    )
    args, overrides = cli.parse_command(parser, argv)
    if not args.preset and not args.grid:
        parser.error("give --preset method|calfuse_ablation or --grid KEY=V1,V2 ...")
    return cli.main_guard(args, overrides, lambda config: _main(args, config, overrides))


def _main(args: argparse.Namespace, config: ml_collections.ConfigDict, overrides) -> int:
    axes = combine(preset(args.preset) if args.preset else (), parse_grid(args.grid))
    check_axes(config, axes)  # a bad grid fails before anything (the cache too) is set up
    if not args.no_compile_cache:
        cli.enable_compile_cache(config)
    config = with_data_fields(config)  # a folder config counts its classes
    args.workdir = args.workdir or default_workdir(args.config, args.preset, args.grid, overrides,
                                                   config)  # fmt: skip
    title = args.title or f"{config.name}: {args.preset or 'grid'}"
    shown = [f"`{o}`" for o in overrides if not o.startswith(("progress", "cache_dir"))]
    notes = [f"Base-config overrides: {', '.join(shown)}."] if shown else []
    done = ablate(config, axes, args.workdir, args.seeds, args.overwrite, title, notes,
                  cell_outputs=args.cell_outputs)  # fmt: skip
    barrier("calfuse_grid_finished")  # no process exits while process 0 still writes
    if is_primary():
        print(markdown_table(done), end="")
        print(f"table: {pathlib.Path(args.workdir) / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
