"""README "Extending": a dataset of your own is a reader module declaring its entry plus a config
file. Both files are written here as README gives them and run end to end."""

import csv
import sys

import numpy as np
import pytest
from PIL import Image
from readme_blocks import blocks

from calfuse_jax import rundir
from calfuse_jax.data import registry
from experiments import run

# README's four blocks: cars.py, cars_config.py, the command, the same dataset from Python.
CARS_PY, CARS_CONFIG_PY, COMMAND, FROM_PYTHON = blocks("Adding a dataset")
# The command's arguments (random weights: the tests have no hub).
ARGS = COMMAND.split("python -m experiments.run", 1)[1].split()
# The data path is under test, not the method: zero-shot skips training's compilations (the
# dominant cost on CPU), and the cache stays in tmp_path.
FAST = (
    "--config.method=zeroshot --config.cache_dir=cache --config.progress=false "
    "--config.outputs.plots=false --config.outputs.tensorboard=false"
)

CLASSES = ("coupe", "pickup", "sedan", "van")


@pytest.fixture
def cars_folder(tmp_path, monkeypatch):
    """tmp_path holding cars.py, cars_config.py and cars-data/ (4 classes x 3 images: the first
    two train, the third test); the registration and the modules are undone afterwards."""
    (tmp_path / "cars.py").write_text(CARS_PY)
    (tmp_path / "cars_config.py").write_text(CARS_CONFIG_PY)
    data = tmp_path / "cars-data"
    (data / "img").mkdir(parents=True)
    rows = []
    for label, name in enumerate(CLASSES):
        for i in range(3):
            file = f"img/{name}_{i}.png"
            Image.fromarray(np.full((12, 10, 3), 40 * label + i, np.uint8)).save(data / file)
            rows.append({"file": file, "class": name, "split": "test" if i == 2 else "train"})
    rows.reverse()  # the listing order must not decide the labels
    with open(data / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "class", "split"])
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "DATASETS", dict(registry.DATASETS))
    yield tmp_path
    for module in ("cars", "_config_cars_config"):
        sys.modules.pop(module, None)


def test_a_csv_dataset_loads_and_runs_end_to_end(cars_folder, capsys):
    scope: dict = {}
    exec(compile(FROM_PYTHON, "from_python", "exec"), scope)
    train = scope["train"]
    assert train.class_names == CLASSES and len(train) == 8
    # Independent reference: each image's pixel value says its class and index.
    for image, label in zip(train.load_batch(range(len(train))), train.labels, strict=True):
        assert int(image[0, 0, 0]) // 40 == label and int(image[0, 0, 0]) % 40 < 2
    assert capsys.readouterr().out.startswith("8 ('coupe', 'pickup', 'sedan', 'van')")

    assert run.main(ARGS + FAST.split()) == 0
    workdir = cars_folder / "runs" / "cars"
    summary = rundir.read_json(workdir / "summary.json")
    assert len(summary["accuracy_matrix"]) == 2  # 4 classes counted, 2 per task
    dataset = rundir.read_json(workdir / "provenance.json")["dataset"]
    assert (dataset["train"]["images"], dataset["test"]["images"]) == (8, 4)


def test_a_built_in_name_cannot_be_taken(cars_folder):
    entry = registry.images.DatasetEntry("cifar100", "not CIFAR", lambda root, split: None)
    with pytest.raises(ValueError, match="built-in dataset"):
        registry.register(entry)
