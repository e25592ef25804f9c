"""`python -m experiments.run` end to end: images -> features -> tasks -> a complete results folder;
the same command again resumes (no encoder call, no task retrained); user errors exit cleanly."""

import csv
import hashlib
import json
import types
from pathlib import Path

import numpy as np
import pytest

import calfuse_jax.continual
import calfuse_jax.features
from calfuse_jax import rundir
from experiments import run
from experiments.configs import apply_overrides, load_config

RESULT_FILES = (
    "config.json",
    "provenance.json",
    "metrics.jsonl",
    "accuracy_matrix.csv",
    "summary.json",
    "accuracy_curve.png",
    "accuracy_matrix.png",
    "run.log",
)


def tiny_args(workdir, cache, *extra):
    # demo:smoke = procedural shapes (no files), random tiny CLIP, 20 images per class; two tasks
    # of 5 classes keep the test to a couple of jit compilations per task.
    return [
        "--config",
        "demo:smoke",
        "--workdir",
        str(workdir),
        f"--config.cache_dir={cache}",
        "--config.continual.initial=5",
        "--config.continual.increment=5",
        "--config.progress=false",
        *extra,
    ]


def fail_if_called(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was called on a resumed run")

    return fail


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny run shared by the tests below (training it is the slow part)."""
    root = tmp_path_factory.mktemp("cli")
    workdir, cache = root / "run", root / "cache"
    assert run.main(tiny_args(workdir, cache)) == 0
    return workdir, cache


def test_every_results_file_exists_and_parses(finished_run):
    workdir, cache = finished_run
    for name in RESULT_FILES:
        assert (workdir / name).is_file(), name
    config = rundir.read_json(workdir / "config.json")
    assert config["name"] == "demo:smoke" and config["continual"]["increment"] == 5
    rows = rundir.read_metrics(workdir)
    assert [r["task"] for r in rows] == [0, 1] and [r["seen_classes"] for r in rows] == [5, 10]
    summary = rundir.read_json(workdir / "summary.json")
    # Avg is the mean of the per-task accuracies, Last the final one (DESIGN.md §3).
    seen = [r["accuracy"] for r in rows]
    assert summary["avg"] == pytest.approx(np.mean(seen))
    assert summary["last"] == pytest.approx(seen[-1])
    with open(workdir / "accuracy_matrix.csv") as f:
        table = list(csv.reader(f))[1:]
    csv_matrix = [[float(v) if v else None for v in row[1:]] for row in table]
    assert np.allclose(
        np.array(csv_matrix, dtype=float),
        np.array(summary["accuracy_matrix"], dtype=float),
        atol=1e-3,
        equal_nan=True,
    )
    assert list(workdir.glob("tensorboard/events.out.tfevents.*"))

    provenance = rundir.read_json(workdir / "provenance.json")
    weights = cache / "models" / "random-tiny-seed0" / "model.safetensors"
    assert provenance["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert provenance["class_order"] == list(range(10))
    assert provenance["task_bounds"] == [0, 5, 10]
    assert len(provenance["split_hash"]) == 64
    assert provenance["prompts"]["class_names"][:2] == ["circle", "square"]
    assert provenance["seed"] == 0 and provenance["packages"]["jax"]
    assert provenance["dataset"]["train"]["images"] == 10 * 20


def test_same_command_resumes_without_encoder_or_training(finished_run, monkeypatch):
    workdir, cache = finished_run
    before = {n: (workdir / n).read_bytes() for n in ("metrics.jsonl", "accuracy_matrix.csv")}
    monkeypatch.setattr(
        calfuse_jax.features, "make_image_encoder", fail_if_called("the image encoder")
    )
    monkeypatch.setattr(calfuse_jax.continual, "_run_task", fail_if_called("task training"))
    assert run.main(tiny_args(workdir, cache)) == 0
    for name, content in before.items():
        assert (workdir / name).read_bytes() == content
    assert "resuming the run in" in (workdir / "run.log").read_text()


def test_a_different_config_in_the_same_workdir_is_refused(finished_run, capsys):
    workdir, cache = finished_run
    before = (workdir / "summary.json").read_bytes()
    assert run.main(tiny_args(workdir, cache, "--config.train.epochs=3")) == 2
    err = capsys.readouterr().err
    assert "holds a run of a different config (train.epochs: 2 -> 3)" in err
    assert "--overwrite" in err and "Traceback" not in err
    assert (workdir / "summary.json").read_bytes() == before


def test_report_rebuilds_plots_from_two_result_folders(finished_run, tmp_path):
    from experiments import report

    workdir, _ = finished_run
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "summary.json"):
        data = rundir.read_json(workdir / name)
        if name == "config.json":
            data["method"] = "rapf"
        rundir.write_json(other / name, data)
    assert report.main([str(workdir), str(other), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "demo:smoke calfuse" in text and "demo:smoke rapf" in text
    assert (tmp_path / "out" / "accuracy_curve.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "demo", "--config.train.epoch=3"], "did you mean 'train.epochs'?"),
        (["--config", "cifar10"], "did you mean 'cifar100'?"),
        (
            ["--config", "cifar100", "--config.dataset.root=/nonexistent/cifar"],
            "/nonexistent/cifar",
        ),
        (["--config", "demo", "--config.model.name=random:huge"], "unknown variant 'huge'"),
    ],
)
def test_user_errors_exit_2_with_one_message(args, message, tmp_path, capsys):
    code = run.main([*args, "--workdir", str(tmp_path / "w"), f"--config.cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_missing_weights_offline_names_the_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code = run.main(
        [
            "--config",
            "demo:smoke",
            "--config.model.name=openai/clip-vit-base-patch16",
            f"--config.cache_dir={tmp_path}",
            "--workdir",
            str(tmp_path / "w"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "config.json" in err and "Traceback" not in err


def test_a_foreign_folder_is_never_used_as_workdir(tmp_path, capsys):
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep me")
    code = run.main(tiny_args(workdir, tmp_path / "cache"))
    assert code == 2 and "holds no calfuse results" in capsys.readouterr().err
    assert [p.name for p in workdir.iterdir()] == ["notes.txt"]


def fake_run_continual(stream, text_features, config, workdir, **kwargs):
    """Stands in for training: a deterministic accuracy curve that depends on the seed."""
    num_tasks = stream.split.num_tasks
    seen = np.array([90.0 - 10 * t - config.seed for t in range(num_tasks)])
    matrix = np.tril(np.ones((num_tasks, num_tasks))) * seen[:, None]
    rows = [
        {"task": t, "seen_classes": int(stream.split.bounds[t + 1]), "accuracy": seen[t]}
        for t in range(num_tasks)
    ]
    Path(workdir, "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"avg": seen.mean(), "last": seen[-1]}
    return types.SimpleNamespace(accuracy_matrix=matrix, seen_accuracy=seen, summary=summary)


def test_several_seeds_write_one_folder_each_and_mean_std(tmp_path, monkeypatch):
    monkeypatch.setattr(calfuse_jax.continual, "run_continual", fake_run_continual)
    overrides = ["seeds=0,1,2", "progress=false", "outputs.seeds_together=false"]
    config = apply_overrides(load_config("synthetic:smoke"), overrides)
    summary = run.run_experiment(config, tmp_path / "multi")
    for seed in (0, 1, 2):
        seed_summary = rundir.read_json(tmp_path / "multi" / f"seed_{seed}" / "summary.json")
        assert seed_summary["seed"] == seed
    # Per seed Avg = 75 - seed (curve 90, 80, 70, 60 minus seed): mean 74, sample std 1.
    assert summary["avg"] == pytest.approx(74.0) and summary["avg_std"] == pytest.approx(1.0)
    assert rundir.read_json(tmp_path / "multi" / "summary.json")["seeds"] == [0, 1, 2]
    assert (tmp_path / "multi" / "accuracy_curve.png").is_file()


def test_seeds_trained_together_give_the_summary_of_seeds_one_after_another(tmp_path):
    summaries = {}
    for together in ("true", "false"):
        overrides = ["seeds=0,1", "progress=false", f"outputs.seeds_together={together}"]
        config = apply_overrides(load_config("synthetic:smoke"), overrides)
        summaries[together] = run.run_experiment(config, tmp_path / together)
    for key in ("avg", "avg_std", "last", "last_std", "forgetting"):
        assert summaries["true"][key] == pytest.approx(summaries["false"][key], abs=1e-4), key
    # Trained together, each seed's run.log still holds only its own run's lines.
    for seed, other in ((0, 1), (1, 0)):
        log = (tmp_path / "true" / f"seed_{seed}" / "run.log").read_text()
        own = (tmp_path / "false" / f"seed_{seed}" / "run.log").read_text()
        assert f"(seed {seed})" in log and f"(seed {other})" not in log
        assert f"seed {other} -> " not in log and f"seed_{other}" not in log
        assert log.count("seen-class accuracy") == own.count("seen-class accuracy") == 4  # tasks


@pytest.mark.slow
def test_the_demo_command_runs(tmp_path, monkeypatch, capsys):
    # README's `python -m experiments.run --config demo --workdir tmp`, in this process (the
    # process boundary is checked elsewhere): it shares the session's compiled programs.
    monkeypatch.setenv("CALFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code = run.main(["--config", "demo", "--workdir", "tmp"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    summary = rundir.read_json(tmp_path / "tmp" / "summary.json")
    assert summary["num_tasks"] == 5 and summary["seen_classes"] == [2, 4, 6, 8, 10]
    assert "| demo calfuse | 5 |" in out


def test_overwrite_moves_the_old_run_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(calfuse_jax.continual, "run_continual", fake_run_continual)
    base = load_config("synthetic:smoke")
    workdir = tmp_path / "w"
    run.run_experiment(base, workdir)
    other = apply_overrides(base, ["train.epochs=2"])
    with pytest.raises(rundir.ConfigMismatchError, match=r"train.epochs: 1 -> 2"):
        run.run_experiment(other, workdir)
    run.run_experiment(other, workdir, overwrite=True)
    aside = [p for p in workdir.iterdir() if p.name.startswith("overwritten-")]
    assert len(aside) == 1
    assert rundir.read_json(aside[0] / "config.json")["train"]["epochs"] == 1
    assert rundir.read_json(workdir / "config.json")["train"]["epochs"] == 2


def test_default_workdir_is_stable_and_names_the_run():
    config = load_config("cifar100:inc5")
    assert run.default_workdir("cifar100:inc5", config) == "runs/cifar100-inc5-calfuse"
    assert run.default_workdir("demo:rapf", load_config("demo:rapf")) == "runs/demo-rapf"
    a = run.default_workdir("cifar100", config, ["train.epochs=3", "cache_dir=/x"])
    b = run.default_workdir("cifar100", config, ["train.epochs=3"])
    assert a == b != run.default_workdir("cifar100", config, ["train.epochs=4"])
    # Seeds, the neutral training-loop fields and output switches name the same run.
    neutral = ["seeds=0,1,2", "seed=4", "train.checkpoint_every_steps=5", "outputs.plots=false"]
    assert run.default_workdir("cifar100", config, ["train.epochs=3", *neutral]) == a


def smoke_args(workdir, *extra):
    # synthetic:smoke: generated features, no encoder; run_continual is replaced in these tests.
    return ["--config", "synthetic:smoke", "--workdir", str(workdir), *extra]


def test_a_nan_loss_exits_3_naming_task_and_step(tmp_path, monkeypatch, capsys):
    def diverging_run(stream, text_features, config, workdir, **kwargs):
        raise calfuse_jax.continual.NonFiniteLossError(1, 3, float("nan"))

    monkeypatch.setattr(calfuse_jax.continual, "run_continual", diverging_run)
    assert run.main(smoke_args(tmp_path / "w")) == 3
    err = capsys.readouterr().err
    assert "loss became nan at task 1, step 3" in err
    assert "last good checkpoint in" in err and "Traceback" not in err
    with pytest.raises(calfuse_jax.continual.NonFiniteLossError):
        run.main(smoke_args(tmp_path / "w2", "--traceback"))


def test_a_config_mismatch_from_the_checkpoints_exits_2(tmp_path, monkeypatch, capsys):
    message = "task checkpoint 0 in w was written by another configuration (ab != cd)"

    def foreign_run(stream, text_features, config, workdir, **kwargs):
        raise calfuse_jax.continual.ConfigMismatchError(message)

    monkeypatch.setattr(calfuse_jax.continual, "run_continual", foreign_run)
    assert run.main(smoke_args(tmp_path / "w")) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err


def test_more_seeds_run_only_the_new_ones(tmp_path, monkeypatch):
    ran = []

    def counting_run(stream, text_features, config, workdir, **kwargs):
        ran.append(config.seed)
        return fake_run_continual(stream, text_features, config, workdir, **kwargs)

    monkeypatch.setattr(calfuse_jax.continual, "run_continual", counting_run)
    base = apply_overrides(
        load_config("synthetic:smoke"), ["progress=false", "outputs.seeds_together=false"]
    )
    workdir = tmp_path / "multi"
    run.run_experiment(apply_overrides(base, ["seeds=0,1"]), workdir)
    seed_0 = (workdir / "seed_0" / "summary.json").read_bytes()
    summary = run.run_experiment(apply_overrides(base, ["seeds=0,1,2"]), workdir)
    assert ran == [0, 1, 2]  # seeds 0 and 1 were reused, not rerun
    assert (workdir / "seed_0" / "summary.json").read_bytes() == seed_0
    # Per seed Avg = 75 - seed: mean over 0, 1, 2 is 74 with sample std 1 (over 0, 1: 74.5).
    assert summary["avg"] == pytest.approx(74.0) and summary["avg_std"] == pytest.approx(1.0)
    assert rundir.read_json(workdir / "summary.json")["seeds"] == [0, 1, 2]
    # Fewer seeds (one too) reuse the seed folders; summary.json covers the seeds asked for now.
    summary = run.run_experiment(apply_overrides(base, ["seeds=0"]), workdir)
    assert ran == [0, 1, 2] and summary["seeds"] == [0]
    assert summary["avg"] == pytest.approx(75.0) and not (workdir / "metrics.jsonl").exists()


def test_outputs_switch_skips_plots_and_tensorboard_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(calfuse_jax.continual, "run_continual", fake_run_continual)
    base = apply_overrides(load_config("synthetic:smoke"), ["progress=false"])
    quiet = apply_overrides(base, ["outputs.plots=false", "outputs.tensorboard=false"])
    workdir = tmp_path / "w"
    run.run_experiment(quiet, workdir)
    assert (workdir / "summary.json").is_file()
    assert not list(workdir.glob("*.png")) and not (workdir / "tensorboard").exists()
    run.run_experiment(base, workdir)  # output-only switches: the same run, resumed
    assert (workdir / "accuracy_curve.png").is_file() and (workdir / "tensorboard").is_dir()
