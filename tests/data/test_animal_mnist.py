"""Animal-MNIST (files read straight from the installed package) and the procedural shapes."""

import gzip
import importlib
import importlib.util
import pickle
import sys

import numpy as np
import pytest

from calfuse_jax.data import animal_mnist as animal_lib
from calfuse_jax.data import shapes
from calfuse_jax.data.shapes import ShapesDataset


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A stand-in `animal_mnist` package with the wheel's file layout and pickle format. Its
    `__init__` raises, as importing the real one would without TensorFlow: the reader must find
    the files without importing the package."""
    package = tmp_path / "site" / "animal_mnist"
    folder = package / "data" / "Animal_MNIST"
    folder.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('No module named tensorflow')\n")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 5).astype(np.int64)
    for name, array in [
        ("animal_data_version_3.gz", images),
        ("animal_label_version_3.gz", labels),
    ]:
        with gzip.open(folder / name, "wb") as f:
            pickle.dump(array, f, protocol=4)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return images, labels


def test_reads_files_without_importing_the_package(fake_package):
    images, labels = fake_package
    train = animal_lib.animal_mnist("train")
    test = animal_lib.animal_mnist("test")
    assert "animal_mnist" not in sys.modules
    assert len(train) == 40 and len(test) == 10
    assert np.bincount(train.labels).tolist() == [4] * 10
    assert train.class_names == (
        "bear",
        "bird",
        "cat",
        "cow",
        "dog",
        "elephant",
        "giraffe",
        "horse",
        "sheep",
        "zebra",
    )
    everything = animal_lib.animal_mnist("all")
    np.testing.assert_array_equal(everything.labels, labels)
    first = everything.load(0)
    assert first.shape == (28, 28, 3)
    np.testing.assert_array_equal(first, np.repeat(images[0][..., None], 3, -1))
    # The seeded split keeps every item exactly once; a different seed moves items.
    assert sorted(np.concatenate([train.images, test.images]).reshape(50, -1).tolist()) == sorted(
        images.reshape(50, -1).tolist()
    )
    assert animal_lib.animal_mnist("train", seed=1).identity != train.identity


def test_missing_package_says_install_with_no_deps(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps animal-mnist"):
        animal_lib.animal_mnist("train")


@pytest.mark.skipif(
    importlib.util.find_spec("animal_mnist") is None, reason="animal-mnist wheel not installed"
)
def test_real_wheel_has_ten_balanced_classes():
    ds = animal_lib.animal_mnist("all")
    assert len(ds) == 10_000 and np.bincount(ds.labels).tolist() == [1000] * 10


def test_shapes_are_deterministic_and_labelled():
    train = ShapesDataset("train", num_per_class=3, image_size=40, seed=0)
    assert len(train) == 30 and train.class_names == shapes.NAMES
    assert train.labels.tolist() == list(range(10)) * 3
    again = ShapesDataset("train", num_per_class=3, image_size=40, seed=0)
    np.testing.assert_array_equal(train.load(17), again.load_batch([5, 17])[1])
    image = train.load(0)
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8
    test = ShapesDataset("test", num_per_class=3, image_size=40, seed=0)
    assert not np.array_equal(train.load(0), test.load(0))
    assert train.identity != test.identity
    # A circle (label 0) is filled at the centre of its bounding box; a ring (label 5) is not.
    for index, filled in [(0, True), (5, False), (10, True), (15, False)]:
        image = train.load(index).astype(int)
        foreground = np.abs(image - image[0, 0]).sum(-1) > 0
        rows, cols = np.flatnonzero(foreground.any(1)), np.flatnonzero(foreground.any(0))
        centre = foreground[(rows[0] + rows[-1]) // 2, (cols[0] + cols[-1]) // 2]
        assert centre == filled, index
