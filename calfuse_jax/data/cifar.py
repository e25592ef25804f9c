"""CIFAR-100 from the official python archive (`cifar-100-python.tar.gz` or its unpacked folder):
pickles `{train,test,meta}` read with the restricted `images.load_data_pickle`."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import tarfile

import numpy as np

from calfuse_jax.data import class_names as names_lib
from calfuse_jax.data import images
from calfuse_jax.data.download import Resource
from calfuse_jax.data.tfds_source import TfdsSpec

CIFAR100_HELP = """Download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (161 MB); pass
root=<the .tar.gz file>, or a folder holding it, or the folder it unpacks to (`tar -xzf` gives
cifar-100-python/{train,test,meta}). Without root= it is fetched into the data folder
(calfuse_jax.paths.data_root). Or prepare the TFDS dataset `cifar100`."""


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


_MEMBERS = ("train", "test", "meta")


def _open_members(root: str) -> dict[str, bytes]:
    """{'train'|'test'|'meta': pickle bytes} from a .tar.gz, a folder holding it, or the folder."""
    root = os.fspath(root)
    for folder in (pathlib.Path(root), pathlib.Path(root, "cifar-100-python")):
        if all((folder / m).is_file() for m in _MEMBERS):
            return {m: (folder / m).read_bytes() for m in _MEMBERS}
    archive = root if os.path.isfile(root) else os.path.join(root, "cifar-100-python.tar.gz")
    if not os.path.isfile(archive):
        raise images.missing_data_error(
            "cifar100",
            f"no cifar-100-python/{{train,test,meta}} or archive at {root!r}",
            CIFAR100_HELP,
        )
    try:
        with tarfile.open(archive, "r:*") as tar:
            return {m: tar.extractfile(f"cifar-100-python/{m}").read() for m in _MEMBERS}
    except (tarfile.TarError, KeyError, EOFError, OSError) as error:
        raise images.missing_data_error(
            "cifar100", f"archive {archive!r} is unreadable or incomplete ({error})", CIFAR100_HELP
        ) from error


def _unpickle(members: dict[str, bytes], name: str, root) -> dict:
    try:
        return {_text(k): v for k, v in images.load_data_pickle(io.BytesIO(members[name])).items()}
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(
            f"cifar100: cifar-100-python/{name} under {os.fspath(root)!r} is not a CIFAR-100 "
            f"pickle ({error}); delete it and fetch the archive again, or set "
            "--config.dataset.root to a good copy"
        ) from None


def cifar100(root, split: str) -> images.ArrayDataset:
    """CIFAR-100 `train` (50,000) or `test` (10,000), fine labels; images uint8 [N, 32, 32, 3]."""
    split = images.train_or_test(split, name="cifar100")
    members = _open_members(root)
    record, meta = (_unpickle(members, name, root) for name in (split, "meta"))
    data = np.asarray(record["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"cifar100 {split}: data has shape {data.shape}, expected [N, 3072]")
    pixels = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW -> HWC
    names = [_text(n) for n in meta["fine_label_names"]]
    if tuple(names) != names_lib.CIFAR100:
        raise ValueError(f"cifar100 meta's {len(names)} fine_label_names are not CIFAR-100's 100")
    labels = np.asarray(record["fine_labels"], dtype=np.int64)
    return images.ArrayDataset(pixels, labels, names, description=f"cifar100/{split}/files")


ENTRY = images.DatasetEntry(
    "cifar100",
    "CIFAR-100, 100 classes, 50,000 train / 10,000 test 32x32 images",
    cifar100,
    names=names_lib.CIFAR100,
    tfds=TfdsSpec("cifar100", {"train": "train", "test": "test"}),
    # md5 from torchvision's datasets/cifar.py (`CIFAR100.tgz_md5`).
    archive=Resource(
        "cifar-100-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "md5",
        "cifar-100-python",
    ),
)
