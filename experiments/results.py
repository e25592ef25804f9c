"""A results folder's summary.json, tensorboard/ events and PNG plots, from plain data (so
`report` can rebuild them from the JSON alone); calfuse_jax.rundir owns the folder."""

import csv
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from calfuse_jax.files import atomic_write
from calfuse_jax.rundir import jsonable

METRICS = ("avg", "last", "forgetting", "bwt", "old", "new", "harmonic")
METRIC_TITLES = {k: k.capitalize() for k in METRICS} | {"bwt": "BWT", "harmonic": "H-mean"}


def make_summary(
    summary: dict, accuracy_matrix: np.ndarray, seen_accuracy: np.ndarray, seen_classes: Sequence
) -> dict:
    """summary.json content: the scalar metrics (%), plus the matrix [T, T] and curve [T]."""
    out = {key: summary[key] for key in METRICS if key in summary} | summary
    out["num_tasks"] = int(len(seen_accuracy))
    out["seen_classes"] = [int(c) for c in seen_classes]
    out["seen_accuracy"] = np.asarray(seen_accuracy, dtype=float).tolist()
    out["accuracy_matrix"] = np.asarray(accuracy_matrix, dtype=float).tolist()
    return jsonable(out)


def aggregate(summaries: Sequence[dict]) -> dict:
    """Mean and sample std over seeds of each metric and of the accuracy curve."""
    out: dict[str, Any] = {"seeds": [s.get("seed") for s in summaries]}
    for key in METRICS:
        values = [s[key] for s in summaries if s.get(key) is not None]
        if values:
            out[key] = float(np.mean(values))
            out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    curves = np.asarray([s["seen_accuracy"] for s in summaries], dtype=float)  # [S, T]
    out["num_tasks"] = int(curves.shape[1])
    out["seen_classes"] = summaries[0]["seen_classes"]
    out["seen_accuracy"] = curves.mean(0).tolist()
    spread = curves.std(0, ddof=1) if len(curves) > 1 else 0 * curves[0]
    out["seen_accuracy_std"] = spread.tolist()
    matrices = np.asarray([s["accuracy_matrix"] for s in summaries], dtype=float)  # [S, T, T]
    out["accuracy_matrix"] = matrices.mean(0).tolist()  # the upper triangle is never read
    return jsonable(out)


def format_metric(summary: dict, key: str) -> str:
    value = summary.get(key)
    if value is None:
        return "—"
    std = summary.get(f"{key}_std")
    if std is not None and len(summary.get("seeds", [])) > 1:
        return f"{value:.2f} ± {std:.2f}"
    return f"{value:.2f}"


def markdown_table(rows: Sequence[tuple[str, dict]]) -> str:
    """A Markdown table: one row per (label, summary), accuracies in %."""
    keys = [k for k in METRICS if any(s.get(k) is not None for _, s in rows)]
    header = "| run | tasks | " + " | ".join(METRIC_TITLES[k] for k in keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 2)]
    for label, summary in rows:
        cells = [format_metric(summary, k) for k in keys]
        lines.append(f"| {label} | {summary.get('num_tasks', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """`rows` as CSV, the first row's keys as the header (None: an empty cell), atomically."""

    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, "w", write)


TRAIN_EVENTS = ".train"  # file-name suffix of the per-step event files (kept by rebuilds)


class TrainingCurves:
    """`run_continual(loss_callback=...)` writing train/loss and train/lr per step into
    workdir/tensorboard; purged from its first step, so a resumed run replaces, not doubles."""

    def __init__(self, workdir: str | os.PathLike):
        self.logdir = pathlib.Path(workdir) / "tensorboard"
        self.writer = None

    def __call__(self, task: int, steps, losses, lrs) -> None:
        from tensorboardX import SummaryWriter

        if self.writer is None:
            self.writer = SummaryWriter(logdir=str(self.logdir), purge_step=int(steps[0]),
                                        flush_secs=30, filename_suffix=TRAIN_EVENTS)  # fmt: skip
        for step, loss, lr in zip(steps, losses, lrs, strict=True):
            self.writer.add_scalar("train/loss", float(loss), int(step))
            self.writer.add_scalar("train/lr", float(lr), int(step))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_tensorboard(workdir: str | os.PathLike, rows: Sequence[dict], summary: dict) -> None:
    """Rebuilds the per-task scalars in workdir/tensorboard (idempotent); keeps TrainingCurves'."""
    from tensorboardX import SummaryWriter

    logdir = pathlib.Path(workdir) / "tensorboard"
    for old in logdir.glob("events.out.tfevents.*"):  # ours alone; rebuilt, so no duplicate steps
        if not old.name.endswith(TRAIN_EVENTS):
            old.unlink()
    with SummaryWriter(logdir=str(logdir)) as writer:
        for row in rows:
            step = int(row["task"])
            for key in ("accuracy", "old_accuracy", "new_accuracy", "loss", "train_seconds"):
                value = row.get(key)
                if isinstance(value, int | float) and math.isfinite(value):
                    writer.add_scalar(f"task/{key}", value, step)
        for key in METRICS:
            if summary.get(key) is not None:
                writer.add_scalar(f"summary/{key}", summary[key], len(rows) - 1)
        writer.add_text("summary", markdown_table([("run", summary)]), 0)


# One colour per method in every chart; joint (an upper bound) is drawn dashed.
METHOD_COLORS = {
    "calfuse": "tab:blue", "rapf": "tab:orange", "finetune": "tab:red", "zeroshot": "tab:gray",
    "ncm": "tab:green", "ncm+text": "tab:olive", "fecam": "tab:purple", "ranpac": "tab:brown",
    "joint": "black",
}  # fmt: skip


def method_style(label: str) -> dict:
    """color and linestyle of the method named as a word of `label` (`synthetic ranpac (3
    seeds)`); {} for any other label."""
    method = next((word for word in label.split() if word in METHOD_COLORS), None)
    if method is None:
        return {}
    return {"color": METHOD_COLORS[method], "linestyle": "--" if method == "joint" else "-"}


def plot_accuracy_curves(
    curves: Sequence[tuple[str, dict]], path: str | os.PathLike, title: str = ""
) -> None:
    """Accuracy on all seen classes after each task, one line (± std band) per (label, summary)."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays untouched

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    for label, summary in curves:
        x = np.asarray(summary["seen_classes"])
        y = np.asarray(summary["seen_accuracy"], dtype=float)
        avg = summary.get("avg")
        name = f"{label} (Avg {avg:.1f})" if avg is not None else label
        style = method_style(label)
        ax.plot(x, y, marker="o", markersize=3, label=name, **style)
        if "seen_accuracy_std" in summary:
            std = np.asarray(summary["seen_accuracy_std"], dtype=float)
            ax.fill_between(x, y - std, y + std, alpha=0.2, color=style.get("color"))
    if curves and len(curves[0][1]["seen_classes"]) <= 20:
        ax.set_xticks(curves[0][1]["seen_classes"])
    ax.set(xlabel="classes seen", ylabel="accuracy on all seen classes (%)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.set_title(title or "accuracy after each task")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_accuracy_matrix(matrix: Any, path: str | os.PathLike, title: str = "") -> None:
    """Heatmap of A[i, j]: accuracy (%) on task j's classes after training task i."""
    from matplotlib.figure import Figure

    a = np.array(matrix, dtype=float)  # [T, T]
    num_tasks = a.shape[0]
    a[np.triu_indices(num_tasks, 1)] = np.nan  # tasks not trained yet: not part of the matrix
    size = min(3.0 + 0.45 * num_tasks, 12.0)
    fig = Figure(figsize=(size, size * 0.85), dpi=120)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(a), vmin=0, vmax=100, cmap="viridis")
    if num_tasks <= 20:
        for i, j in np.argwhere(np.isfinite(a)):
            color = "black" if a[i, j] > 60 else "white"
            ax.text(j, i, f"{a[i, j]:.0f}", ha="center", va="center", fontsize=7, color=color)
    ticks = np.arange(0, num_tasks, max(1, num_tasks // 10))
    ax.set(xticks=ticks, yticks=ticks, xlabel="evaluated on task j", ylabel="after training task i")
    ax.set_title(title or "accuracy matrix (%)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)


def write_plots(workdir: str | os.PathLike, summary: dict, label: str) -> list[pathlib.Path]:
    """accuracy_curve.png and accuracy_matrix.png of one run (or a multi-seed mean)."""
    workdir = pathlib.Path(workdir)
    curve, heatmap = workdir / "accuracy_curve.png", workdir / "accuracy_matrix.png"
    plot_accuracy_curves([(label, summary)], curve, title=label)
    plot_accuracy_matrix(summary["accuracy_matrix"], heatmap, title=f"{label}: A[i, j] (%)")
    return [curve, heatmap]
