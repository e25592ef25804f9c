"""Datasets that need no download: Animal-MNIST (from the `animal-mnist` wheel) and "shapes".

Animal-MNIST: 10,000 grayscale 28x28 silhouettes, 1,000 per class, of bear, bird, cat, cow, dog,
elephant, giraffe, horse, sheep, zebra (labels 0-9 in that order: the package's description lists
them alphabetically and a look at the images confirms the order). The wheel ships two gzipped
pickles of NumPy arrays, `animal_mnist/data/Animal_MNIST/animal_{data,label}_version_3.gz`. We find
them with `importlib.util.find_spec` (the package's own loader imports TensorFlow, so it is never
imported) and read them with the restricted unpickler. There is no official split: a seeded
per-class 80/20 split (`images.seeded_class_split`).

Shapes: seeded coloured geometric shapes of 10 named classes, drawn on demand; any size, no
files at all. Used by the offline demo when the wheel is absent.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from calfuse_jax.data import class_names as names_lib
from calfuse_jax.data.cifar import load_data_pickle
from calfuse_jax.data.images import ArrayDataset, ImageDataset, seeded_class_split

INSTALL_LINE = "pip install --no-deps animal-mnist"
_DATA_FILE = "animal_data_version_3.gz"
_LABEL_FILE = "animal_label_version_3.gz"


def animal_mnist_files() -> tuple[str, str]:
    """Paths of the (images, labels) files inside the installed `animal_mnist` package."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "animal_mnist: the `animal-mnist` package is not installed.\n\nHow to fix:\n"
            f"    {INSTALL_LINE}\n(--no-deps matters: the wheel declares TensorFlow, which is not "
            "needed to read its files.) Or use the dataset 'shapes', which needs no files."
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data", "Animal_MNIST")
    paths = (os.path.join(folder, _DATA_FILE), os.path.join(folder, _LABEL_FILE))
    absent = [p for p in paths if not os.path.isfile(p)]
    if absent:
        raise FileNotFoundError(
            f"animal_mnist: the installed package lacks {absent}.\n\nHow to fix:\n"
            f"    pip install --force-reinstall --no-deps animal-mnist==0.4"
        )
    return paths


def _read_array(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.asarray(load_data_pickle(f, encoding="latin1"))


def animal_mnist(split: str, *, train_fraction: float = 0.8, seed: int = 0) -> ArrayDataset:
    """Animal-MNIST `train` / `test` / `all`; images uint8 [28, 28] served as [28, 28, 3]."""
    data_path, label_path = animal_mnist_files()
    images, labels = _read_array(data_path), _read_array(label_path).astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"animal_mnist: unexpected arrays {images.shape}, {labels.shape}")
    if split != "all":
        train, test = seeded_class_split(labels, train_fraction=train_fraction, seed=seed)
        keep = {"train": train, "test": test}.get(split)
        if keep is None:
            raise ValueError(f"animal_mnist splits are 'train', 'test', 'all'; got {split!r}")
        images, labels = images[keep], labels[keep]
    description = f"animal_mnist/{split}/package/seed={seed},frac={train_fraction}"
    return ArrayDataset(images, labels, names_lib.ANIMAL_MNIST, description=description)


SHAPES_VERSION = 1  # bump when the drawing changes, so cached features are recomputed


class ShapesDataset(ImageDataset):
    """Procedural images: one of 10 shapes in a random colour, size, place and rotation.

    Item `i` has label `i % 10` and is drawn from `default_rng([seed, split_id, i])`, so any
    item can be made alone, in any order, on any machine, with the same pixels.
    """

    def __init__(self, split: str, *, num_per_class: int = 50, image_size: int = 64, seed: int = 0):
        splits = {"train": 0, "test": 1}
        if split not in splits:
            raise ValueError(f"shapes splits are 'train' and 'test'; got {split!r}")
        self.split_id, self.image_size, self.seed = splits[split], image_size, seed
        num_classes = len(names_lib.SHAPES)
        self.labels = np.arange(num_per_class * num_classes, dtype=np.int64) % num_classes
        self.class_names = names_lib.SHAPES
        self.identity = (
            f"shapes/{split}/procedural/v{SHAPES_VERSION}/n={len(self.labels)},"
            f"size={image_size},seed={seed}"
        )

    def load(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.split_id, int(index)])
        return draw_shape(int(self.labels[index]), rng, self.image_size)


def _polygon(cx, cy, radius, sides, angle, star=False):
    points = []
    count = sides * 2 if star else sides
    for k in range(count):
        r = radius * (0.45 if star and k % 2 else 1.0)
        theta = angle + 2 * math.pi * k / count
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


def draw_shape(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draws shape `label` (index into `class_names.SHAPES`) -> uint8 [size, size, 3]."""
    background = tuple(int(v) for v in rng.integers(0, 90, 3))
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.22, 0.38)
    cx, cy = (size / 2 + rng.uniform(-0.12, 0.12, 2) * size).tolist()
    angle = rng.uniform(0, 2 * math.pi)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    name = names_lib.SHAPES[label]
    if name == "circle":
        draw.ellipse(box, fill=colour)
    elif name == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius * 0.3)))
    elif name == "square":
        draw.polygon(_polygon(cx, cy, radius, 4, angle), fill=colour)
    elif name == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius * 0.6, cy), (cx, cy + radius),
                      (cx - radius * 0.6, cy)], fill=colour)  # fmt: skip
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, radius, 3, angle), fill=colour)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, radius, 6, angle), fill=colour)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, radius, 5, angle, star=True), fill=colour)
    elif name == "cross":
        arm = radius * 0.35
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=colour)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=colour)
    elif name == "crescent":
        draw.ellipse(box, fill=colour)
        shift = radius * 0.5
        draw.ellipse((box[0] + shift, box[1] - shift * 0.3, box[2] + shift, box[3] - shift * 0.3),
                     fill=background)  # fmt: skip
    else:  # stripes
        step = max(3, int(size / rng.integers(5, 9)))
        for y in range(int(rng.integers(0, step)), size, step):
            draw.rectangle((0, y, size, y + step // 2), fill=colour)
    return np.asarray(image, dtype=np.uint8)


def shapes(split: str, *, num_per_class: int = 50, image_size: int = 64, seed: int = 0):
    """The procedural shapes dataset (see `ShapesDataset`)."""
    return ShapesDataset(split, num_per_class=num_per_class, image_size=image_size, seed=seed)
