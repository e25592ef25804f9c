"""experiments.report rebuilds one chart and one table from several results folders."""

import csv
import json

import numpy as np
from PIL import Image

from calfuse_jax import rundir
from experiments import report, results


def fake_run(folder, method, seen, seeds=None):
    """A results folder as run_experiment leaves it (config.json + summary.json), built by hand
    so the report is tested without training anything."""
    folder.mkdir(parents=True)
    seen = np.asarray(seen, float)
    matrix = np.tril(np.full((len(seen), len(seen)), 1.0)) * seen[:, None]
    summary = results.make_summary(
        {"avg": float(seen.mean()), "last": float(seen[-1])},
        matrix,
        seen,
        [10 * (i + 1) for i in range(len(seen))],
    )
    if seeds:
        summary = results.aggregate([dict(summary, seed=s) for s in seeds])
    rundir.write_json(folder / "summary.json", summary)
    rundir.write_json(folder / "config.json", {"name": "cifar100", "method": method})
    return folder


def test_report_of_two_runs_has_one_chart_and_a_table(tmp_path):
    a = fake_run(tmp_path / "a", "calfuse", [90.0, 80.0, 70.0])
    b = fake_run(tmp_path / "b", "rapf", [90.0, 70.0, 50.0], seeds=[0, 1])
    out = tmp_path / "out"
    assert report.main([str(a), str(b), "--out", str(out), "--title", "CIFAR-100"]) == 0
    text = (out / "report.md").read_text()
    assert "# CIFAR-100" in text
    assert "| cifar100 calfuse | 3 | 80.00 | 70.00 |" in text
    assert "| cifar100 rapf (2 seeds) | 3 | 70.00 ± 0.00 | 50.00 ± 0.00 |" in text
    names = {p.name for p in out.iterdir()}
    assert {
        "accuracy_curve.png",
        "accuracy_matrix_cifar100_calfuse.png",
        "accuracy_matrix_cifar100_rapf_2_seeds.png",
        "report.csv",
    } <= names
    for name in names - {"report.md", "report.csv"}:
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["cifar100 calfuse", "cifar100 rapf (2 seeds)"]
    assert float(rows[1]["last"]) == 50.0


def test_same_labels_get_their_folder_names(tmp_path):
    a = fake_run(tmp_path / "x1", "calfuse", [80.0, 60.0])
    b = fake_run(tmp_path / "x2", "calfuse", [70.0, 60.0])
    path = report.build_report([a, b], tmp_path / "out")
    text = path.read_text()
    assert "cifar100 calfuse [x1]" in text and "cifar100 calfuse [x2]" in text


def test_a_run_in_progress_is_reported_from_its_metrics(tmp_path):
    folder = tmp_path / "live"
    folder.mkdir()
    rows = [
        {"task": 0, "seen_classes": 10, "accuracy": 90.0, "accuracy_row": [90.0]},
        {"task": 1, "seen_classes": 20, "accuracy": 75.0, "accuracy_row": [70.0, 80.0]},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    label, summary = report.load_run(folder)
    assert label == "live (partial)"
    assert summary["avg"] == 82.5 and summary["last"] == 75.0
    assert summary["accuracy_matrix"] == [[90.0, None], [70.0, 80.0]]


def test_a_folder_without_results_is_a_clear_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "holds no summary.json or metrics.jsonl" in capsys.readouterr().err
