"""Plain-file readers on trees the tests build: class folders, ImageNet-R, ImageNet-100, CUB-200."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from calfuse_jax.data import class_names as names_lib
from calfuse_jax.data import cub, imagenet, images


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


@pytest.fixture
def tree(tmp_path):
    """Three classes, unsorted creation order, odd sizes, one grayscale and one RGBA image (the
    reader must return [H, W, 3] for both), and a non-image file that must be ignored."""
    rng = np.random.default_rng(0)
    arrays = {
        "zebra/b.png": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
        "zebra/a.png": rng.integers(0, 256, (6, 4, 3), dtype=np.uint8),
        "apple/x.png": rng.integers(0, 256, (3, 3), dtype=np.uint8),  # grayscale
        "mango/y.png": rng.integers(0, 256, (4, 4, 4), dtype=np.uint8),  # RGBA
    }
    for rel, array in arrays.items():
        _png(str(tmp_path / "root" / rel), array)
    (tmp_path / "root" / "zebra" / "notes.txt").write_text("not an image")
    return tmp_path / "root", arrays


def test_folder_dataset_labels_pixels_and_channels(tree):
    root, arrays = tree
    ds = images.folder_dataset(root)
    assert ds.class_names == ("apple", "mango", "zebra")
    assert ds.files == ("apple/x.png", "mango/y.png", "zebra/a.png", "zebra/b.png")
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 2])
    assert ds.labels.dtype == np.int64 and len(ds) == 4
    gray = ds.load(0)
    assert gray.shape == (3, 3, 3) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray, np.repeat(arrays["apple/x.png"][..., None], 3, -1))
    np.testing.assert_array_equal(ds.load(1), arrays["mango/y.png"][..., :3])
    batch = ds.load_batch([3, 2])
    np.testing.assert_array_equal(batch[0], arrays["zebra/b.png"])
    np.testing.assert_array_equal(batch[1], arrays["zebra/a.png"])


def test_identity_is_content_based_and_location_free(tree, tmp_path):
    root, _ = tree
    copy = tmp_path / "elsewhere"
    shutil.copytree(root, copy)
    assert images.folder_dataset(root).identity == images.folder_dataset(copy).identity
    _png(str(copy / "apple" / "new.png"), np.zeros((2, 2, 3), np.uint8))
    assert images.folder_dataset(root).identity != images.folder_dataset(copy).identity


def test_folder_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        images.folder_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="<class name>/<image>"):
        images.folder_dataset(tmp_path / "empty")


def _reference_split(labels, fraction, seed):
    """The documented rule, written out independently: one generator, classes in label order."""
    rng = np.random.default_rng(seed)
    train = []
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        order = rng.permutation(len(members))
        train += members[order[: int(round(fraction * len(members)))]].tolist()
    return sorted(train)


@pytest.fixture
def imagenet_r_root(tmp_path):
    """The tarball layout: imagenet-r/<wnid>/*.jpg for all 200 wnids, 5 (empty) files each, plus
    one class with 7 files so that the rounding of 0.8 * n is exercised (5.6 -> 6)."""
    for k, wnid in enumerate(names_lib.wnids(names_lib.IMAGENET_R)):
        for j in range(7 if k == 3 else 5):
            _touch(str(tmp_path / "imagenet-r" / wnid / f"img_{j}.jpg"))
    return tmp_path


def test_imagenet_r_seeded_split(imagenet_r_root):
    train = imagenet.imagenet_r(imagenet_r_root, "train", seed=3)
    test = imagenet.imagenet_r(imagenet_r_root, "test", seed=3)
    assert len(train) + len(test) == 1002 and not set(train.files) & set(test.files)
    assert train.class_names[:2] == ("goldfish", "great_white_shark")
    assert np.bincount(train.labels).tolist() == [4, 4, 4, 6] + [4] * 196
    half_train = imagenet.imagenet_r(imagenet_r_root, "train", seed=3, train_fraction=0.5)
    half_test = imagenet.imagenet_r(imagenet_r_root, "test", seed=3, train_fraction=0.5)
    assert len(set(half_train.files) | set(half_test.files)) == 1002
    # Compare with the rule written out here (files in sorted wnid / file order).
    listing = [
        f"{w}/img_{j}.jpg"
        for k, w in enumerate(names_lib.wnids(names_lib.IMAGENET_R))
        for j in range(7 if k == 3 else 5)
    ]
    labels = np.asarray(
        [names_lib.wnids(names_lib.IMAGENET_R).index(f.split("/")[0]) for f in listing]
    )
    expected = [listing[i] for i in _reference_split(labels, 0.8, 3)]
    assert sorted(train.files) == sorted(expected)
    assert imagenet.imagenet_r(imagenet_r_root, "train", seed=4).files != train.files
    assert imagenet.imagenet_r(imagenet_r_root, "train", seed=3).identity == train.identity


def test_imagenet_r_split_file_and_partial_download(imagenet_r_root, tmp_path):
    wnid = names_lib.IMAGENET_R[5][0]
    split_file = tmp_path / "test.txt"
    split_file.write_text(f"imagenet-r/{wnid}/img_1.jpg 5\n{wnid}/img_0.jpg 5\n")
    ds = imagenet.imagenet_r(imagenet_r_root, "test", split_file=split_file)
    assert ds.files == (f"{wnid}/img_0.jpg", f"{wnid}/img_1.jpg")
    np.testing.assert_array_equal(ds.labels, [5, 5])
    shutil.rmtree(imagenet_r_root / "imagenet-r" / wnid)
    with pytest.raises(FileNotFoundError, match="(?s)partial.*imagenet-r.tar"):
        imagenet.imagenet_r(imagenet_r_root, "train")


def test_imagenet100_folders_flat_val_and_names(tmp_path):
    wnids = names_lib.wnids(names_lib.IMAGENET100)
    for w in wnids + ("n15075141",):  # one class outside the subset must be ignored
        _touch(str(tmp_path / "train" / w / f"{w}_1.JPEG"))
    (tmp_path / "LOC_synset_mapping.txt").write_text(f"{wnids[0]} tench fish, Tinca tinca\n")
    train = imagenet.imagenet_subset(tmp_path, "train")
    assert len(train) == 100 and train.labels.tolist() == list(range(100))
    assert train.class_names[:2] == ("tench fish", "goldfish")
    # Flat validation folder: labels from TFDS's validation_labels.txt (image k -> line k).
    truth = imagenet._imagenet_val_labels()
    chosen = [k for k, w in enumerate(truth) if w in wnids][:3] + [truth.index("n15075141")]
    for k in chosen:
        _touch(str(tmp_path / "val" / f"ILSVRC2012_val_{k + 1:08d}.JPEG"))
    val = imagenet.imagenet_subset(tmp_path, "val")
    assert len(val) == 3
    assert val.labels.tolist() == [wnids.index(truth[k]) for k in chosen[:3]]


def test_cub200_official_split(tmp_path):
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    (root / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    a, b = "001.Black_footed_Albatross", "002.Laysan_Albatross"
    # (image id, path, class id, is_train): the split file, not the order, decides membership.
    rows = [
        (1, f"{a}/a.jpg", 1, 1),
        (2, f"{b}/b.jpg", 2, 0),
        (3, f"{a}/c.jpg", 1, 0),
        (4, f"{b}/d.jpg", 2, 1),
    ]
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    for _, path, _, _ in rows:
        _png(str(root / "images" / path), np.full((2, 2, 3), 7, np.uint8))
    train, test = cub.cub200(tmp_path, "train"), cub.cub200(root, "test")
    assert train.files == (
        "images/001.Black_footed_Albatross/a.jpg",
        "images/002.Laysan_Albatross/d.jpg",
    )
    assert train.labels.tolist() == [0, 1] and test.labels.tolist() == [1, 0]
    assert train.class_names == ("Black_footed_Albatross", "Laysan_Albatross")
    assert train.load(1).shape == (2, 2, 3)
    (root / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match="(?s)train_test_split.txt.*CUB_200_2011.tgz"):
        cub.cub200(root, "train")


def test_split_file_with_train_and_test_sections(imagenet_r_root, tmp_path):
    # RAPF's format: a `train` line, training images, a `test` line, test images.
    wnid = names_lib.IMAGENET_R[5][0]
    split_file = tmp_path / "rapf.txt"
    split_file.write_text(f"train\n{wnid}/img_0.jpg\n{wnid}/img_1.jpg\ntest\n{wnid}/img_4.jpg\n")
    train = imagenet.imagenet_r(imagenet_r_root, "train", split_file=split_file)
    test = imagenet.imagenet_r(imagenet_r_root, "val", split_file=split_file)
    assert train.files == (f"{wnid}/img_0.jpg", f"{wnid}/img_1.jpg")
    assert test.files == (f"{wnid}/img_4.jpg",) and train.identity != test.identity
    split_file.write_text(f"{wnid}/img_2.jpg\ntrain\n{wnid}/img_0.jpg\ntest\n{wnid}/img_4.jpg\n")
    with pytest.raises(ValueError, match="before its first train/test line"):
        imagenet.imagenet_r(imagenet_r_root, "train", split_file=split_file)
    split_file.write_text(f"train\n{wnid}/img_0.jpg\n")
    with pytest.raises(ValueError, match="lists no images for 'test'"):
        imagenet.imagenet_r(imagenet_r_root, "test", split_file=split_file)
