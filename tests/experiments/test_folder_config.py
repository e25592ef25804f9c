"""`--config folder --config.dataset.root=DIR`: the user's own images with nothing else to set,
and the demo config pointed at a folder failing with a message instead of a TypeError."""

import os

import pytest
from image_folders import write_image_folder

from calfuse_jax import rundir
from experiments import run
from experiments.configs import apply_overrides, load_config

CLASSES = ("daisy", "red_rose", "tulip", "iris", "lily", "orchid")


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """ROOT/<class>/<i>.png: 6 classes x 10 tiny images, a different mean colour per class."""
    root = tmp_path_factory.mktemp("data") / "flowers"
    return write_image_folder(root, CLASSES, colour_step=30, seed=0)


@pytest.fixture(scope="module")
def folder_run(flowers, tmp_path_factory):
    """(the folder the command ran in, its results folder, cache) of a run under umask 0o077
    (also the private-umask check of the results and cache permissions)."""
    cwd = tmp_path_factory.mktemp("cwd")
    old_mask = os.umask(0o077)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(cwd)
            # random:tiny only because tests have no hub; the config's default is OpenAI CLIP.
            code = run.main(
                [
                    "--config",
                    "folder",
                    f"--config.dataset.root={flowers}",
                    "--config.model.name=random:tiny",
                    "--config.cache_dir=cache",
                    "--config.train.epochs=0",
                    "--config.progress=false",
                ]  # fmt: skip
            )
    finally:
        os.umask(old_mask)
    assert code == 0
    folders = list((cwd / "runs").iterdir())
    assert len(folders) == 1, folders
    return cwd, folders[0], cwd / "cache"


def test_the_folder_names_the_run_and_gives_classes_and_tasks(folder_run):
    _, workdir, _ = folder_run
    # runs/folder-<dir>-calfuse-<hash of the model and epoch overrides>
    assert workdir.name.startswith("folder-flowers-calfuse-")
    provenance = rundir.read_json(workdir / "provenance.json")
    assert provenance["prompts"]["class_names"] == sorted(c.replace("_", " ") for c in CLASSES)
    assert provenance["class_order"] == list(range(6))  # identity: sorted folder order
    assert provenance["task_bounds"] == [0, 2, 4, 6]  # B0, ceil(6 / 5) = 2 classes per task
    assert provenance["dataset"]["train"]["images"] == 6 * 8  # the seeded 80/20 split
    config = rundir.read_json(workdir / "config.json")
    assert config["name"] == "folder-flowers" and config["dataset"]["num_classes"] == 6
    summary = rundir.read_json(workdir / "summary.json")
    assert summary["config"] == "folder-flowers" and summary["num_tasks"] == 3
    assert summary["seen_classes"] == [2, 4, 6]
    assert 0 <= summary["last"] <= 100


def test_a_private_umask_keeps_results_and_cache_private(folder_run):
    _, workdir, cache = folder_run
    for folder in (workdir, cache):
        for path in [folder, *folder.rglob("*")]:
            assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path


def test_the_increment_can_still_be_chosen(flowers, tmp_path):
    config = apply_overrides(
        load_config("folder"), [f"dataset.root={flowers}", "continual.increment=3"]
    )
    resolved = run.with_data_fields(config)
    assert (resolved.continual.initial, resolved.continual.increment) == (3, 3)
    assert run.default_workdir("folder", resolved) == "runs/folder-flowers-calfuse"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "folder"], "--config.dataset.root=DIR"),
        # The demo's shapes options do not fit the folder reader: a message, not a TypeError.
        (
            ["--config", "demo", "--config.dataset.name=folder", "--config.dataset.root=."],
            "does not take the option(s) image_size, num_per_class",
        ),  # fmt: skip
    ],
)
def test_folder_mistakes_exit_2_with_the_fix(args, message, tmp_path, capsys):
    code = run.main([*args, "--workdir", str(tmp_path / "w"), f"--config.cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "w").exists()
