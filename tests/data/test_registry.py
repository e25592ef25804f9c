"""`load_dataset`: source selection, option checking, and one message when data is missing."""

import numpy as np
import pytest
from PIL import Image

from calfuse_jax.data import registry, tfds_source
from calfuse_jax.data.registry import DATASETS, load_dataset


def test_every_benchmark_and_demo_dataset_is_registered():
    for name in (
        "cifar100",
        "imagenet_r",
        "imagenet100",
        "cub200",
        "animal_mnist",
        "shapes",
        "folder",
    ):
        assert name in DATASETS and DATASETS[name].description


def test_folder_through_the_registry(tmp_path):
    for cls, value in [("b", 1), ("a", 2)]:
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((3, 3, 3), value, np.uint8)).save(tmp_path / cls / "0.png")
    ds = load_dataset("folder", "all", root=tmp_path, class_names=["ant", "bee"])
    assert ds.class_names == ("ant", "bee") and ds.labels.tolist() == [0, 1]
    assert ds.load(0)[0, 0, 0] == 2  # folder "a" sorts first


def test_folder_splits_by_subfolders_or_seeded(tmp_path):
    # train/ has classes a, b, c; test/ lacks b: test labels must still use train's numbering.
    for split, classes in [("train", "abc"), ("test", "ac")]:
        for cls in classes:
            (tmp_path / "split" / split / cls).mkdir(parents=True)
            for k in range(2):
                Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(
                    tmp_path / "split" / split / cls / f"{k}.png"
                )
    test = load_dataset("folder", "test", root=tmp_path / "split")
    assert test.class_names == ("a", "b", "c") and test.labels.tolist() == [0, 0, 2, 2]
    assert load_dataset("folder", "train", root=tmp_path / "split").labels.tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    # No split folders: seeded per-class split (5 images per class -> 4 train / 1 test).
    for cls in "xy":
        (tmp_path / "flat" / cls).mkdir(parents=True)
        for k in range(5):
            Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(
                tmp_path / "flat" / cls / f"{k}.png"
            )
    train = load_dataset("folder", "train", root=tmp_path / "flat", seed=1)
    test = load_dataset("folder", "test", root=tmp_path / "flat", seed=1)
    assert np.bincount(train.labels).tolist() == [4, 4] and np.bincount(test.labels).tolist() == [
        1,
        1,
    ]
    assert not set(train.files) & set(test.files)


def test_shapes_and_split_aliases():
    ds = load_dataset("shapes", "val", num_per_class=2, image_size=16)
    assert len(ds) == 20 and ds.identity.startswith("shapes/test/")
    assert ds.load(3).shape == (16, 16, 3)


def test_bad_names_splits_options_and_sources():
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        load_dataset("cifar10", "train")
    with pytest.raises(ValueError, match="splits"):
        load_dataset("cifar100", "holdout", root=".")
    with pytest.raises(TypeError, match="unknown: \\['sed'\\]"):
        load_dataset("imagenet_r", "train", root=".", sed=1)
    with pytest.raises(ValueError, match="not 'tfds'"):
        load_dataset("shapes", "train", source="tfds")
    with pytest.raises(ValueError, match="only work with source='files'"):
        load_dataset("imagenet_r", "train", source="tfds", split_file="x.txt")


def test_auto_without_data_and_download_off_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError) as info:  # no TFDS dataset prepared, nothing fetched
        load_dataset("cifar100", "train", data_dir=tmp_path, download=False, download_dir=tmp_path)
    message = str(info.value)
    assert "downloading is off" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message
    assert f"save it as {tmp_path / 'cifar-100-python.tar.gz'}" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cifar-100-python.tar.gz.lock"]


def test_auto_prefers_root_then_prepared_tfds(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(tfds_source, "find_prepared", lambda name, data_dir: f"{data_dir}/{name}")
    monkeypatch.setattr(
        tfds_source, "tfds_dataset", lambda e, split, **kw: calls.append((e.name, split, kw))
    )
    load_dataset("imagenet_r", "test", data_dir=tmp_path, split_protocol="seeded", seed=5)
    kept = dict(data_dir=tmp_path, download=True, cache_dir=None, seed=5)
    assert calls == [("imagenet_r", "test", kept)]
    with pytest.raises(FileNotFoundError, match="imagenet-r.tar"):  # root given -> files
        load_dataset("imagenet_r", "test", root=tmp_path / "none", split_protocol="seeded")
    pick = registry._pick_source
    assert pick(DATASETS["cub200"], "auto", None, tmp_path, {}) == "tfds"
    # ImageNet-R's default split is RAPF's list, which only the files give: TFDS is passed over.
    assert pick(DATASETS["imagenet_r"], "auto", None, tmp_path, {}) == "files"
    with pytest.raises(ValueError, match="split_protocol='rapf'.*only work with source='files'"):
        load_dataset("imagenet_r", "test", source="tfds", split_protocol="rapf")
