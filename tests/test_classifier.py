"""`load_classifier` and `python -m experiments.predict` on a finished demo run: image by image the
labels of the run's own evaluation (recomputed from the cached features and the run's returned
head), the CLI's top-1 and JSON, and the refusals (corrupt image, unfinished run, other weights)."""

import json
import shlex
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from calfuse_jax import calibration, clip, load_classifier, methods
from calfuse_jax.classifier import ClassifierError
from calfuse_jax.continual import run_continual, unit_rows
from experiments import pipeline, predict, run
from experiments.configs import apply_overrides, load_config
from tests.readme_blocks import blocks


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(workdir, config, test images uint8 [M, 64, 64, 3]) of one finished two-task demo run."""
    root = tmp_path_factory.mktemp("classifier")
    workdir = root / "run"
    overrides = [f"cache_dir={root}/c", "continual.initial=5", "continual.increment=5"]
    args = ["--config", "demo:smoke", "--workdir", str(workdir), "-q"]
    assert run.main(args + [f"--config.{o}" for o in overrides]) == 0
    config = apply_overrides(load_config("demo:smoke"), [*overrides, "progress=false"])
    test = pipeline.load_split(config, "test")
    return workdir, config, np.stack([test.load(i) for i in range(len(test))])


def test_predict_gives_the_runs_own_evaluation_image_by_image(finished):
    workdir, config, images = finished
    # The reference: the run's head as `run_continual` returns it (resumed, nothing retrained)
    # on the cached test features, through `method.logits` as the run's evaluation calls it.
    prepared = pipeline.prepare(config)
    stream, split = prepared.stream, prepared.stream.split
    result = run_continual(stream, prepared.text_features, config, workdir, progress=False,
                           logit_scale=prepared.logit_scale)  # fmt: skip
    method = methods.REGISTRY[config.method].build(
        config, stream.dim, prepared.logit_scale, split.num_classes
    )
    last, seen = split.num_tasks - 1, split.num_classes
    ctx = calibration.task_context(split.bounds, last)
    text = jnp.asarray(unit_rows(stream.text_by_position(prepared.text_features)))
    means, chols, pairs = result.stats.means, result.stats.chols, jnp.zeros((1, 2), jnp.int32)
    inputs = methods.TaskInputs(text, ctx, means, chols, pairs, jnp.zeros(1), result.params, ctx)
    logits = np.asarray(method.logits(result.params, jnp.asarray(stream.test_features), inputs))
    expected = split.class_order[np.argmax(logits[:, :seen], axis=1)]
    # ...which is the run's evaluation: its per-task accuracies are the matrix's last row.
    positions = split.to_positions(stream.test_labels)
    correct = expected == stream.test_labels
    for t in range(split.num_tasks):
        in_task = (positions >= split.bounds[t]) & (positions < split.bounds[t + 1])
        assert 100 * correct[in_task].mean() == pytest.approx(result.accuracy_matrix[last, t])

    classifier = load_classifier(workdir)
    assert classifier.task == last and list(classifier.labels) == list(split.class_order)
    labels, names, probs = classifier.predict(images)
    np.testing.assert_array_equal(labels, expected)
    assert names == [classifier.names[list(classifier.labels).index(label)] for label in labels]
    top_labels, _, top_probs = classifier.top_k(images[:7], 3)
    assert top_labels.shape == (7, 3) and (top_labels[:, 0] == labels[:7]).all()
    assert (np.diff(top_probs, axis=1) <= 0).all() and np.allclose(top_probs[:, 0], probs[:7])


def test_the_cli_prints_predicts_top1_and_json(finished, tmp_path, capsys):
    workdir, _, images = finished
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    paths = [folder / ("more" if i % 2 else "") / f"{i:02d}.png" for i in range(12)]
    for path, image in zip(paths, images[::17], strict=True):
        Image.fromarray(image).save(path)
    paths = sorted(paths)
    _, names, _ = load_classifier(workdir).predict(paths)
    assert predict.main(["--workdir", str(workdir), str(folder), "--top-k", "3", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(p) for p in paths]
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == names
    assert predict.main(["--workdir", str(workdir), str(paths[0]), "--json", "-q"]) == 0
    (out,) = json.loads(capsys.readouterr().out)
    assert out["image"] == str(paths[0]) and len(out["top_k"]) == 5
    assert out["top_k"][0]["name"] == names[0] and 0 < out["top_k"][0]["probability"] <= 1

    (folder / "more" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert predict.main(["--workdir", str(workdir), str(folder), "-q"]) == 2
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "Traceback" not in captured.err and not captured.out


def test_unfinished_runs_and_other_weights_are_refused(finished, tmp_path, capsys):
    workdir, _, images = finished
    with pytest.raises(ClassifierError, match="no run folder"):
        load_classifier(tmp_path / "nowhere")
    other = clip.random_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(ClassifierError, match="not the ones the run was trained with"):
        load_classifier(workdir, weights=other)
    partial = tmp_path / "partial"
    shutil.copytree(workdir, partial)
    shutil.rmtree(partial / "checkpoints" / "tasks" / "1")
    assert predict.main(["--workdir", str(partial), str(partial / "accuracy_curve.png")]) == 2
    assert "is unfinished (finished tasks [0] of 0..1)" in capsys.readouterr().err
    first = load_classifier(partial, task=0)
    assert len(first.names) == 5 and set(first.predict(images[:4])[0]) <= set(range(5))


def test_readme_example_runs(finished, tmp_path, monkeypatch, capsys):
    workdir, _, images = finished
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo-calfuse").symlink_to(workdir)
    (tmp_path / "my_photos").mkdir()
    for name, image in (("photo.png", images[0]), ("my_photos/a.png", images[1])):
        Image.fromarray(image).save(name)
    code, command = blocks("Using a trained model")
    exec(code, {})
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "experiments.predict"]
    assert predict.main([*argv[3:], "-q"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
