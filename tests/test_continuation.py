"""Continuing a finished run with new classes: the same numbers as the whole stream run in one
go (library), and `python -m experiments.run --continue-from` with an image folder of new classes
(the old folder untouched, clashing class names refused with exit 2)."""

import shlex
import shutil

import jax
import numpy as np
import pytest
from image_folders import write_image_folder

from calfuse_jax import load_classifier, rundir
from calfuse_jax.config import method_config
from calfuse_jax.continual import run_continual
from calfuse_jax.continuation import ContinuationError, continue_run
from calfuse_jax.data.protocol import TaskSplit
from calfuse_jax.data.stream import FeatureStream
from calfuse_jax.data.synthetic import make_synthetic_stream
from experiments import run
from tests.readme_blocks import blocks


def six_tasks():
    # 6 tasks x 2 classes, 16-d, close pairs (hard pairs and pseudo-features of old classes).
    return make_synthetic_stream(
        num_classes=12, dim=16, train_per_class=12, test_per_class=6, initial=2, increment=2,
        seed=5, close_pairs=3,
    )  # fmt: skip


def five_of(stream: FeatureStream) -> FeatureStream:
    """The stream of the first 5 tasks' classes only (a run that never heard of the sixth)."""
    order = stream.split.class_order[:10]
    train, test = np.isin(stream.train_labels, order), np.isin(stream.test_labels, order)
    return FeatureStream(
        stream.train_features[train], stream.train_labels[train],
        stream.test_features[test], stream.test_labels[test],
        TaskSplit(order, stream.split.bounds[:6]),
    )  # fmt: skip


def small_config():
    c = method_config()
    c.train.update(epochs=2, milestones=(1,), batch_size=8, lr=1e-2)
    c.loss.kd_weight = 0.5
    c.logit_scale = 95.0
    return c


def test_a_continued_run_equals_the_whole_stream_in_one_go(tmp_path):
    stream, text = six_tasks()
    whole = run_continual(stream, text, small_config(), tmp_path / "whole", progress=False)
    old = tmp_path / "old"
    run_continual(five_of(stream), text, small_config(), old, progress=False)
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    trained = set()  # only the sixth task trains: the first five come from the old run
    continued = continue_run(old, stream, text, small_config(), tmp_path / "new", progress=False,
                             step_callback=lambda task, steps: trained.add(task))  # fmt: skip
    assert trained == {5}
    # Bit for bit: the class axis only pads the text, statistics and logits (masked classes
    # enter no sum but as exact zeros), and the random draws do not depend on its length.
    np.testing.assert_array_equal(continued.accuracy_matrix, whole.accuracy_matrix)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 continued.params, whole.params)  # fmt: skip
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    record = rundir.read_json(tmp_path / "new" / "continued_from.json")
    assert record["run"] == str(old) and record["tasks"] == 5 and record["classes"] == 10
    assert record["added_labels"] == stream.split.class_order[10:].tolist()
    prints = [rundir.read_json(d / "run_fingerprint.json")["fingerprint"] for d in (old,
              tmp_path / "new", tmp_path / "whole")]  # fmt: skip
    assert prints[0] != prints[1] == prints[2]  # the continued run is the 6-task run
    # Run again: the continuation resumes (nothing retrained), the same matrix.
    again = continue_run(old, stream, text, small_config(), tmp_path / "new", progress=False,
                         step_callback=lambda task, steps: trained.add(-1))  # fmt: skip
    assert trained == {5}
    np.testing.assert_array_equal(again.accuracy_matrix, whole.accuracy_matrix)

    with pytest.raises(ContinuationError, match="are not the run in"):
        other = small_config()
        other.train.lr = 2e-2
        continue_run(old, stream, text, other, tmp_path / "other", progress=False)
    with pytest.raises(ContinuationError, match="has 5 tasks and the run"):
        continue_run(old, five_of(stream), text, small_config(), tmp_path / "o", progress=False)
    assert not (tmp_path / "other").exists() and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A finished two-task demo run (random tiny CLIP, shapes images) and its files' bytes."""
    root = tmp_path_factory.mktemp("continue")
    workdir = root / "demo-calfuse"
    overrides = [f"cache_dir={root}/cache", "continual.initial=5", "continual.increment=5",
                 "dataset.max_per_class=6", "train.epochs=1"]  # fmt: skip
    args = ["--config", "demo:smoke", "--workdir", str(workdir), "-q"]
    assert run.main(args + [f"--config.{o}" for o in overrides]) == 0
    return workdir, files_of(workdir)


def files_of(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def image_folder(root, names):
    """ROOT/<name>/<i>.png: 10 tiny images per class, a different mean colour per class."""
    write_image_folder(root, names, colour_step=40, seed=1)


def test_readme_continues_the_demo_with_an_image_folder(demo_run, tmp_path, monkeypatch):
    old, before = demo_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo-calfuse").symlink_to(old)
    image_folder(tmp_path / "my_new_classes", ["blob", "zig_zag"])
    (command,) = blocks("Continuing a run with new classes")
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:3] == ["python", "-m", "experiments.run"]
    assert run.main([*argv[3:], "-q"]) == 0
    new = tmp_path / "runs" / "demo-calfuse+folder-my_new_classes"
    assert files_of(old) == before  # the old run is only read
    provenance = rundir.read_json(new / "provenance.json")
    assert provenance["continued_from"]["run"] == str(tmp_path / "runs" / "demo-calfuse")
    assert provenance["continued_from"]["added_names"] == ["blob", "zig zag"]
    assert provenance["task_bounds"] == [0, 5, 10, 11, 12]  # folder: ceil(2 / 5) = 1 per task
    assert provenance["prompts"]["class_names"][10:] == ["blob", "zig zag"]
    config = rundir.read_json(new / "config.json")
    assert config["name"] == "demo:smoke+folder-my_new_classes" and config["continuation"]["run"]
    # The old tasks' rows are the old run's; the new ones add rows and columns.
    old_rows = rundir.read_json(old / "summary.json")["accuracy_matrix"]
    matrix = rundir.read_json(new / "summary.json")["accuracy_matrix"]
    assert len(matrix) == 4 and [r[:2] for r in matrix[:2]] == [r[:2] for r in old_rows]
    assert all(v is not None for v in matrix[3])
    classifier = load_classifier(new)
    assert classifier.names[10:] == ("blob", "zig zag") and len(classifier.labels) == 12


def test_clashing_class_names_and_other_fields_exit_2(demo_run, tmp_path, capsys):
    old, before = demo_run
    image_folder(tmp_path / "more", ["circle", "blob"])  # circle: one of the demo's shapes
    root, new = f"--config.dataset.root={tmp_path}/more", str(tmp_path / "new")
    base = ["--continue-from", str(old), "--config", "folder", root, "--workdir", new]
    assert run.main(base) == 2
    err = capsys.readouterr().err
    assert "'circle'" in err and "already exist" in err and "Traceback" not in err, err
    assert run.main([*base, "--config.train.epochs=3"]) == 2
    assert "--config.train.epochs=3: a continued run keeps" in capsys.readouterr().err
    partial = tmp_path / "partial"
    shutil.copytree(old, partial)
    shutil.rmtree(partial / "checkpoints" / "tasks" / "1")
    image_folder(tmp_path / "fresh", ["blob"])
    fresh = f"--config.dataset.root={tmp_path}/fresh"
    assert run.main(["--continue-from", str(partial), "--config", "folder", fresh]) == 2
    assert "is unfinished (finished tasks [0] of 0..1)" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and files_of(old) == before
