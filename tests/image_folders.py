"""Tiny class-per-folder image trees for the folder-dataset tests."""

import numpy as np
from PIL import Image


def write_image_folder(root, names, colour_step: int, seed: int, per_class: int = 10):
    """ROOT/<name>/<i>.png: `per_class` 16x16 images per class, the mean colour rising by
    `colour_step` grey levels from one class to the next."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (16, 16, 3)) + colour_step * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root
