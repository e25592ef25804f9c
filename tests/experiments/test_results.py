"""Results-folder writers: JSON, summaries, the multi-seed aggregate, TensorBoard, PNG plots."""

import math
import struct

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from experiments import results

NAN = float("nan")


def read_events(logdir):
    """Scalars of every event file under `logdir`: {tag: [(step, value)]}.

    Parsed by hand from the TFRecord framing (u64 length, u32 crc, payload, u32 crc), so the test
    does not rely on the writer to read its own files back.
    """
    scalars = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def summary_of(seed, seen):
    seen = np.asarray(seen, float)
    matrix = np.full((len(seen), len(seen)), NAN)
    for i in range(len(seen)):
        matrix[i, : i + 1] = seen[i]
    avg = float(seen.mean())
    s = results.make_summary(
        {"avg": avg, "last": seen[-1], "forgetting": NAN}, matrix, seen, [2, 4]
    )
    s["seed"] = seed
    return s


def test_make_summary_keeps_metrics_matrix_and_curve():
    s = summary_of(0, [80.0, 60.0])
    assert s["avg"] == 70.0 and s["last"] == 60.0 and s["forgetting"] is None
    assert s["num_tasks"] == 2 and s["seen_classes"] == [2, 4]
    assert s["accuracy_matrix"] == [[80.0, None], [60.0, 60.0]]


def test_aggregate_mean_and_sample_std():
    summaries = [
        summary_of(0, [80.0, 60.0]),
        summary_of(1, [70.0, 50.0]),
        summary_of(2, [90.0, 40.0]),
    ]
    agg = results.aggregate(summaries)
    # By hand: Avg per seed 70, 60, 65 -> mean 65, sample std 5; Last 60, 50, 40 -> 50, 10.
    assert agg["avg"] == pytest.approx(65.0) and agg["avg_std"] == pytest.approx(5.0)
    assert agg["last"] == pytest.approx(50.0) and agg["last_std"] == pytest.approx(10.0)
    assert agg["seen_accuracy"] == pytest.approx([80.0, 50.0])
    assert agg["seen_accuracy_std"] == pytest.approx([10.0, 10.0])
    assert agg["seeds"] == [0, 1, 2] and "forgetting" not in agg  # all None: no metric
    table = results.markdown_table([("calfuse", agg)])
    assert "| calfuse | 2 | 65.00 ± 5.00 | 50.00 ± 10.00 |" in table


def test_markdown_table_single_run_and_missing_metrics():
    s = summary_of(0, [80.0, 61.234])
    table = results.markdown_table([("a", s), ("b", dict(s, bwt=-3.0))])
    lines = table.splitlines()
    assert lines[0] == "| run | tasks | Avg | Last | BWT |"
    assert lines[2] == "| a | 2 | 70.62 | 61.23 | — |"
    assert lines[3] == "| b | 2 | 70.62 | 61.23 | -3.00 |"


def test_tensorboard_events_hold_the_metrics_rows(tmp_path):
    rows = [
        {"task": 0, "accuracy": 90.0, "old_accuracy": None, "new_accuracy": 90.0, "loss": 1.5},
        {"task": 1, "accuracy": 70.0, "old_accuracy": 65.0, "new_accuracy": 75.0, "loss": 0.5},
    ]
    summary = summary_of(0, [90.0, 70.0])
    results.write_tensorboard(tmp_path, rows, summary)
    results.write_tensorboard(tmp_path, rows, summary)  # a resume rewrites, never duplicates
    scalars = read_events(tmp_path / "tensorboard")
    assert scalars["task/accuracy"] == [(0, 90.0), (1, 70.0)]
    assert scalars["task/old_accuracy"] == [(1, 65.0)]
    assert scalars["summary/avg"] == [(1, 80.0)]
    assert math.isclose(scalars["task/loss"][1][1], 0.5)


def test_plots_are_png_files(tmp_path):
    summary = summary_of(0, [90.0, 70.0])
    paths = results.write_plots(tmp_path, summary, "demo calfuse")
    agg = results.aggregate([summary, summary_of(1, [80.0, 60.0])])
    results.plot_accuracy_curves([("one", summary), ("mean", agg)], tmp_path / "both.png")
    for path in [*paths, tmp_path / "both.png"]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_plots_leave_the_matplotlib_backend_and_pyplot_alone(tmp_path, monkeypatch):
    # A notebook's inline backend must survive a run: no matplotlib.use, no pyplot figures.
    import matplotlib
    import matplotlib.pyplot as plt

    def forbidden(*args, **kwargs):
        raise AssertionError("plots must use matplotlib.figure.Figure, not pyplot/backends")

    for module, name in ((matplotlib, "use"), (plt, "subplots"), (plt, "figure")):
        monkeypatch.setattr(module, name, forbidden)
    summary = summary_of(0, [90.0, 70.0])
    for path in results.write_plots(tmp_path, summary, "demo calfuse"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
