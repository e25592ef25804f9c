"""ImageNet-100, B0 Inc10 (10 tasks of 10 classes), Continual-CLIP class order, CLIP ViT-B/16.

    python -m experiments.run --config imagenet100 --config.dataset.root=/data/imagenet

Data: an ImageNet-2012 train/val tree (or a prepared TFDS `imagenet2012`), 100 of its classes.
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import defaults

# The public Continual-CLIP order (position -> dataset label), as RAPF and CalFuse use it.
CLASS_ORDER = (
    68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38, 58, 70, 77,
    1, 85, 19, 17, 50, 28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44, 91, 41, 72, 60, 79,
    52, 20, 10, 31, 54, 37, 95, 14, 71, 96, 98, 97, 2, 64, 66, 42, 22, 35, 86, 24, 34, 87,
    21, 99, 0, 88, 27, 18, 94, 11, 12, 47, 25, 30, 46, 62, 69, 36, 61, 7, 63, 75, 5, 32, 4,
    51, 48, 73, 93, 39, 67, 29, 49, 57, 33,
)  # fmt: skip

# RAPF's configs/class/imagenet100_<initial>-<increment>.yaml; other splits take the first row.
RAPF_SPLITS = {  # (initial, increment): (batch size, beta, mix_bias, threshold, shrinkage)
    (10, 10): (128, 1, 0.5, 0.65, False),
    (5, 5): (128, 1, 0.5, 0.65, False),
    (20, 20): (128, 0.5, 0.5, 0.65, False),
    (50, 10): (128, 1, 0.5, 0.65, False),
    (50, 5): (128, 1, 0.5, 0.65, False),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Variants: see `defaults.VARIANTS`."""
    c = defaults.benchmark("imagenet100", 100, CLASS_ORDER, arg, RAPF_SPLITS, classes_per_batch=2)
    c.dataset.test_split = "validation"
    c.dataset.options.class_file = config_dict.placeholder(str)  # default: the built-in 100 wnids
    return c
