"""Shapes: seeded coloured geometric shapes of 10 classes drawn on demand, no files (the demo's)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from calfuse_jax.data.images import DatasetEntry, ImageDataset, train_or_test

NAMES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon", "crescent",
         "stripes")  # fmt: skip
SHAPES_VERSION = 1  # bump when the drawing changes, so cached features are recomputed


class ShapesDataset(ImageDataset):
    """Item `i`: shape `i % 10` in a colour, size, place and rotation drawn from
    `default_rng([seed, split_id, i])`, so any item can be made alone with the same pixels."""

    def __init__(self, split: str, *, num_per_class: int = 50, image_size: int = 64, seed: int = 0):
        split = train_or_test(split, name="shapes")
        self.split_id, self.image_size, self.seed = ("train", "test").index(split), image_size, seed
        self.labels = np.arange(num_per_class * len(NAMES), dtype=np.int64) % len(NAMES)
        self.class_names = NAMES
        self.fixed_size = (image_size, image_size)
        self.identity = (
            f"shapes/{split}/procedural/v{SHAPES_VERSION}/n={len(self.labels)},"
            f"size={image_size},seed={seed}"
        )

    def load(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.split_id, int(index)])
        return draw_shape(int(self.labels[index]), rng, self.image_size)


_SIDES = {"square": 4, "triangle": 3, "hexagon": 6, "star": 5}


def _polygon(cx, cy, radius, sides, angle, star=False):
    points = []
    count = sides * 2 if star else sides
    for k in range(count):
        r = radius * (0.45 if star and k % 2 else 1.0)
        theta = angle + 2 * math.pi * k / count
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


def draw_shape(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draws shape `label` (index into `NAMES`) -> uint8 [size, size, 3]."""
    background = tuple(int(v) for v in rng.integers(0, 90, 3))
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.22, 0.38)
    cx, cy = (size / 2 + rng.uniform(-0.12, 0.12, 2) * size).tolist()
    angle = rng.uniform(0, 2 * math.pi)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    name = NAMES[label]
    if name == "circle":
        draw.ellipse(box, fill=colour)
    elif name == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius * 0.3)))
    elif name in _SIDES:
        draw.polygon(_polygon(cx, cy, radius, _SIDES[name], angle, name == "star"), fill=colour)
    elif name == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius * 0.6, cy), (cx, cy + radius),
                      (cx - radius * 0.6, cy)], fill=colour)  # fmt: skip
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


ENTRY = DatasetEntry(
    "shapes",
    "procedural coloured shapes, 10 classes, generated on demand (no files)",
    ShapesDataset,
    source="procedural",
    options=("seed", "num_per_class", "image_size"),
    names=NAMES,
)
