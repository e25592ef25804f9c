"""The run folder: identity and claim, the lock, atomic results files, damaged files rebuilt."""

import json

import numpy as np
import pytest

from calfuse_jax import rundir
from calfuse_jax.config import method_config, resolve_method
from calfuse_jax.data.synthetic import make_synthetic_stream


def _doc(config=None, **stream_args):
    stream, _ = make_synthetic_stream(num_classes=10, dim=8, train_per_class=4, test_per_class=2,
                                      initial=5, increment=5, **stream_args)  # fmt: skip
    return rundir.config_fingerprint(resolve_method(config or method_config()), stream, 100.0)


def test_fingerprint_tracks_method_fields_and_data_only():
    base = _doc()
    extra = method_config()
    extra.dataset = "cifar100"  # extra fields (experiments add them) are ignored
    extra.train.checkpoint_every_steps = 50  # neutral: resuming may change it
    assert _doc(extra)["fingerprint"] == base["fingerprint"]
    changed = method_config()
    changed.fusion.mix_bias = 0.7
    assert _doc(changed)["fingerprint"] != base["fingerprint"]
    assert _doc(seed=1)["fingerprint"] != base["fingerprint"]  # other features, same shapes


def test_prepare_workdir_refuses_foreign_results(tmp_path):
    doc = _doc()
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # results of unknown origin
    with pytest.raises(rundir.ConfigMismatchError, match="without a readable run_fingerprint.json"):
        rundir.prepare_workdir(tmp_path, doc, overwrite=False)
    rundir.prepare_workdir(tmp_path, doc, overwrite=True)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("overwritten-")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").read_text() == "{}\n"
    assert json.loads((tmp_path / rundir.FINGERPRINT_FILE).read_text()) == doc
    rundir.prepare_workdir(tmp_path, doc, overwrite=False)  # same run: accepted


def test_write_results_files(tmp_path):
    accuracy = np.array([[80.0, np.nan], [70.5, 60.25]])
    rows = [{"task": 0, "old_accuracy": float("nan")}, {"task": 1, "old_accuracy": 70.5}]
    rundir.write_results(tmp_path, rows, accuracy)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"task": 0, "old_accuracy": None},  # strict JSON: NaN becomes null
        {"task": 1, "old_accuracy": 70.5},
    ]
    csv = (tmp_path / "accuracy_matrix.csv").read_text()
    assert csv == "after_task,task_0,task_1\n0,80.0000,\n1,70.5000,60.2500\n"


def test_write_json_is_atomic_and_maps_nan_and_arrays(tmp_path):
    path = tmp_path / "a" / "x.json"
    rundir.write_json(path, {"m": np.array([[1.0, np.nan]]), "t": (1, 2), "s": np.float32(0.5)})
    assert json.loads(path.read_text()) == {"m": [[1.0, None]], "t": [1, 2], "s": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temp file left behind
