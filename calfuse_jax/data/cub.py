"""CUB-200-2011 from its own files: `images/` plus the id tables, with the official split."""

from __future__ import annotations

import os

from calfuse_jax.data import class_names as names_lib
from calfuse_jax.data.download import Resource
from calfuse_jax.data.images import DatasetEntry, FileDataset, missing_data_error, train_or_test
from calfuse_jax.data.tfds_source import TfdsSpec

CUB_HELP = """Download CUB_200_2011.tgz (https://data.caltech.edu/records/65de6-vp158), unpack:
    tar -xzf CUB_200_2011.tgz -C DATA_ROOT
giving DATA_ROOT/CUB_200_2011/{images/, images.txt, image_class_labels.txt,
train_test_split.txt, classes.txt}; pass root=DATA_ROOT (or DATA_ROOT/CUB_200_2011). Without
root= it is fetched into the data folder (calfuse_jax.paths.data_root). Or prepare the TFDS
dataset `caltech_birds2011`."""


def _read_id_table(path) -> dict[int, str]:
    with open(path, encoding="utf-8") as f:
        return {int(a): b for a, b in (line.split(maxsplit=1) for line in f if line.strip())}


def cub200(root, split: str) -> FileDataset:
    """CUB-200-2011, official split; labels = class id - 1, names from `classes.txt`."""
    root, split = os.fspath(root), train_or_test(split, name="cub200")
    if os.path.isdir(os.path.join(root, "CUB_200_2011")):
        root = os.path.join(root, "CUB_200_2011")
    needed = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"]
    absent = [f for f in needed + ["images"] if not os.path.exists(os.path.join(root, f))]
    if absent:
        raise missing_data_error("cub200", f"missing {absent} under {root!r}", CUB_HELP)
    tables = (_read_id_table(os.path.join(root, f)) for f in needed)
    images, classes, is_train, class_table = tables
    names = [class_table[i].strip().split(".", 1)[-1] for i in sorted(class_table)]
    want = 1 if split == "train" else 0
    ids = [i for i in sorted(images) if int(is_train[i].strip()) == want]
    files = [f"images/{images[i].strip()}" for i in ids]
    sample = files[:: max(1, len(files) // 50)]
    lost = [f for f in sample if not os.path.exists(os.path.join(root, f))]
    if lost:
        raise missing_data_error("cub200", f"image files missing, e.g. {lost[:3]}", CUB_HELP)
    labels = [int(classes[i].strip()) - 1 for i in ids]
    return FileDataset(root, files, labels, names, description=f"cub200/{split}/files")


ENTRY = DatasetEntry(
    "cub200",
    "CUB-200-2011 birds, 200 classes, official train/test split",
    cub200,
    names=names_lib.CUB200,
    tfds=TfdsSpec("caltech_birds2011", {"train": "train", "test": "test"}),
    # sha256 from tensorflow_datasets' url_checksums/caltech_birds2011.txt.
    archive=Resource(
        "CUB_200_2011.tgz",
        "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
        "0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081",
        "sha256",
        "CUB_200_2011",
    ),
)
