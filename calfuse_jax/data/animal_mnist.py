"""Animal-MNIST: 10,000 grayscale 28x28 animal silhouettes read from the `animal-mnist` wheel's
gzipped pickles (found with `find_spec`: the package's own loader imports TensorFlow). No official
split: a seeded per-class 80/20 split.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np

from calfuse_jax.data import images

# Labels 0-9: the package lists them alphabetically, and the images confirm the order.
NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def animal_mnist_files() -> tuple[str, str]:
    """Paths of the (images, labels) files inside the installed `animal_mnist` package."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "animal_mnist: the `animal-mnist` package is not installed.\n\nHow to fix:\n"
            "    pip install --no-deps animal-mnist\n(--no-deps matters: the wheel declares "
            "TensorFlow, which is not needed to read its files.) Or use the dataset 'shapes', "
            "which needs no files."
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data", "Animal_MNIST")
    paths = tuple(os.path.join(folder, f"animal_{k}_version_3.gz") for k in ("data", "label"))
    absent = [p for p in paths if not os.path.isfile(p)]
    if absent:
        raise FileNotFoundError(
            f"animal_mnist: the installed package lacks {absent}.\n\nHow to fix:\n"
            f"    pip install --force-reinstall --no-deps animal-mnist==0.4"
        )
    return paths


def _read_array(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.asarray(images.load_data_pickle(f, encoding="latin1"))


def animal_mnist(split: str, *, train_fraction: float = 0.8, seed: int = 0) -> images.ArrayDataset:
    """Animal-MNIST `train` / `test` / `all`; images uint8 [28, 28] served as [28, 28, 3]."""
    split = images.train_or_test(split, ENTRY.splits, "animal_mnist")
    data_path, label_path = animal_mnist_files()
    pixels, labels = _read_array(data_path), _read_array(label_path).astype(np.int64)
    if pixels.shape[1:] != (28, 28) or len(pixels) != len(labels):
        raise ValueError(f"animal_mnist: unexpected arrays {pixels.shape}, {labels.shape}")
    if split != "all":
        train, test = images.seeded_class_split(labels, train_fraction=train_fraction, seed=seed)
        keep = train if split == "train" else test
        pixels, labels = pixels[keep], labels[keep]
    description = f"animal_mnist/{split}/package/seed={seed},frac={train_fraction}"
    return images.ArrayDataset(pixels, labels, NAMES, description=description)


ENTRY = images.DatasetEntry(
    "animal_mnist",
    "Animal-MNIST, 10 animal silhouettes, 28x28 grayscale, from the animal-mnist wheel",
    animal_mnist,
    source="package",
    splits=("train", "test", "all"),
    options=("seed", "train_fraction"),
    names=NAMES,
)
