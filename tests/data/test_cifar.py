"""CIFAR-100 reader on a fake archive with the real layout (Python-2 style pickles, bytes keys)."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from calfuse_jax.data import cifar, images
from calfuse_jax.data import class_names as names_lib


def _pickle(record) -> bytes:
    # The real archive was written by Python 2's cPickle: protocol 2, byte-string keys.
    return pickle.dumps({k.encode(): v for k, v in record.items()}, protocol=2)


@pytest.fixture
def archive(tmp_path):
    """12 train / 5 test rows of random planar [3 * 32 * 32] pixels; names as bytes, as in the
    real `meta`. Returns (tar.gz path, train data, train labels)."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (12, 3072), dtype=np.uint8)
    labels = rng.integers(0, 100, 12).tolist()
    members = {
        "train": _pickle(
            {
                "data": data,
                "fine_labels": labels,
                "coarse_labels": [0] * 12,
                "filenames": [b"f%d.png" % i for i in range(12)],
            }
        ),
        "test": _pickle(
            {
                "data": data[:5],
                "fine_labels": labels[:5],
                "coarse_labels": [0] * 5,
                "filenames": [b"t.png"] * 5,
            }
        ),
        "meta": _pickle(
            {
                "fine_label_names": [n.encode() for n in names_lib.CIFAR100],
                "coarse_label_names": [b"x"] * 20,
            }
        ),
    }
    path = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path, data, labels


def test_pixels_follow_the_planar_layout(archive):
    path, data, labels = archive
    ds = cifar.cifar100(path, "train")
    assert len(ds) == 12 and ds.labels.tolist() == labels
    assert ds.class_names == names_lib.CIFAR100
    # Pixel (row, col) of channel ch sits at data[ch * 1024 + row * 32 + col] (CIFAR docs).
    for i, row, col, ch in [(0, 0, 0, 0), (3, 5, 17, 1), (11, 31, 31, 2), (7, 30, 2, 0)]:
        assert ds.load(i)[row, col, ch] == data[i, ch * 1024 + row * 32 + col]
    assert ds.load(4).shape == (32, 32, 3) and ds.load(4).dtype == np.uint8
    assert len(cifar.cifar100(path, "test")) == 5


def test_archive_folder_and_unpacked_forms_agree(archive, tmp_path):
    path, _, _ = archive
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    from_tar = cifar.cifar100(path, "train")
    from_parent = cifar.cifar100(tmp_path, "train")  # folder holding the .tar.gz
    from_folder = cifar.cifar100(tmp_path / "unpacked", "train")
    from_inner = cifar.cifar100(tmp_path / "unpacked" / "cifar-100-python", "train")
    assert from_tar.identity == from_parent.identity == from_folder.identity == from_inner.identity
    np.testing.assert_array_equal(from_tar.images, from_inner.images)


def test_missing_truncated_and_malicious(archive, tmp_path):
    path, _, _ = archive
    with pytest.raises(FileNotFoundError, match="(?s)cifar-100-python.tar.gz"):
        cifar.cifar100(tmp_path / "nowhere", "train")
    truncated = tmp_path / "bad" / "cifar-100-python.tar.gz"
    os.makedirs(truncated.parent)
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FileNotFoundError, match="unreadable or incomplete"):
        cifar.cifar100(truncated, "train")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        images.load_data_pickle(io.BytesIO(pickle.dumps({"data": Evil()})))
