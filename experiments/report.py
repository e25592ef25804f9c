"""Rebuilds plots and a Markdown table from one or more results folders (a run in progress from
its finished tasks): report.md, report.csv, accuracy_curve.png, accuracy_matrix_<label>.png.

    python -m experiments.report runs/cifar100-calfuse runs/cifar100-rapf --out report/
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from collections.abc import Sequence

import numpy as np

from calfuse_jax import rundir
from experiments import results


def summary_from_metrics(rows: Sequence[dict]) -> dict:
    """A partial summary (Avg, Last, matrix, curve) from the metrics rows of finished tasks."""
    matrix = np.full((len(rows), len(rows)), np.nan)  # [T, T]
    for i, row in enumerate(rows):
        matrix[i, : len(row["accuracy_row"])] = row["accuracy_row"]
    seen = [float(row["accuracy"]) for row in rows]
    summary = {"avg": float(np.mean(seen)), "last": seen[-1], "partial": True}
    return results.make_summary(summary, matrix, seen, [row["seen_classes"] for row in rows])


def load_run(workdir: str | pathlib.Path) -> tuple[str, dict]:
    """(label, summary) of a results folder; label = '<config> <method>'."""
    workdir = pathlib.Path(workdir)
    config = rundir.read_json(workdir / "config.json") if (workdir / "config.json").exists() else {}
    label = " ".join(str(config[k]) for k in ("name", "method") if k in config) or workdir.name
    if (workdir / "summary.json").exists():
        summary = rundir.read_json(workdir / "summary.json")
        if len(summary.get("seeds") or ()) > 1:
            label += f" ({len(summary['seeds'])} seeds)"
    elif metrics := rundir.read_metrics(workdir):
        summary = summary_from_metrics(metrics)
        label += " (partial)"
    else:
        raise ValueError(
            f"{workdir} holds no summary.json or metrics.jsonl: not a results folder, or a run "
            "that finished no task yet (re-run its command to resume it)"
        )
    return label, summary


def build_report(
    workdirs: Sequence[str | pathlib.Path], out: str | pathlib.Path, title: str = ""
) -> pathlib.Path:
    """Writes report.md, report.csv and the plots of `workdirs` into `out`; returns report.md."""
    folders = [pathlib.Path(w) for w in workdirs]
    loaded = [load_run(f) for f in folders]
    labels = [label for label, _ in loaded]  # a label shown twice gets its folder's name
    rows = [
        (f"{label} [{folder.name}]" if labels.count(label) > 1 else label, summary)
        for (label, summary), folder in zip(loaded, folders, strict=True)
    ]
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results.plot_accuracy_curves(rows, out / "accuracy_curve.png", title=title)
    images = ["accuracy_curve.png"]
    for label, summary in rows:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")
        name = "accuracy_matrix.png" if len(rows) == 1 else f"accuracy_matrix_{slug}.png"
        results.plot_accuracy_matrix(summary["accuracy_matrix"], out / name, title=label)
        images.append(name)
    columns = [f"{k}{s}" for k in results.METRICS for s in ("", "_std")]
    table = [{"run": label, "num_tasks": summary.get("num_tasks"),
              **{c: summary.get(c) for c in columns}} for label, summary in rows]  # fmt: skip
    results.write_csv(out / "report.csv", table)
    lines = [f"# {title or 'Results'}", "", "Accuracy in % on all classes seen so far.", ""]
    lines += [results.markdown_table(rows), "| run | folder |", "|---|---|"]
    lines += [f"| {label} | `{folder}` |" for (label, _), folder in zip(rows, folders, strict=True)]
    lines += ["", *(f"![{name}]({name})" for name in images)]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Plots and a Markdown table from one or more results folders.",
    )
    parser.add_argument("workdirs", nargs="+", help="results folders (run_experiment workdirs)")
    parser.add_argument("--out", help="output folder (default: the folder itself for one run, "
                        "./report for several)")  # fmt: skip
    parser.add_argument("--title", default="", help="chart and report title")
    args = parser.parse_args(argv)
    out = args.out or (args.workdirs[0] if len(args.workdirs) == 1 else "report")
    try:
        report = build_report(args.workdirs, out, args.title)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.read_text(), end="")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
