"""ImageNet-R, B0 Inc20 (10 tasks of 20 classes), Continual-CLIP class order, CLIP ViT-B/16.

    python -m experiments.run --config imagenet_r

ImageNet-R has no official split: RAPF's train/test list (or split_protocol=seeded, a split file).
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import defaults

# The public Continual-CLIP order (position -> dataset label), as RAPF and CalFuse use it.
CLASS_ORDER = (
    29, 75, 18, 9, 62, 46, 133, 54, 89, 24, 135, 158, 119, 198, 49, 96, 32, 21, 79, 3, 65,
    131, 191, 30, 140, 113, 84, 95, 188, 167, 127, 164, 185, 170, 168, 136, 98, 12, 121,
    186, 193, 172, 51, 19, 104, 108, 161, 178, 73, 152, 7, 61, 39, 67, 14, 91, 111, 41, 56,
    194, 23, 145, 184, 165, 189, 122, 128, 48, 66, 47, 148, 92, 199, 109, 160, 110, 132,
    102, 154, 107, 33, 70, 80, 173, 187, 97, 43, 81, 153, 147, 112, 17, 52, 195, 144, 50,
    146, 40, 141, 143, 106, 10, 22, 115, 162, 44, 1, 34, 134, 26, 183, 4, 87, 139, 45, 94,
    27, 83, 130, 103, 126, 138, 35, 123, 190, 105, 71, 88, 76, 156, 180, 176, 25, 37, 137,
    6, 15, 175, 192, 63, 11, 31, 8, 196, 36, 159, 85, 28, 77, 93, 174, 78, 171, 150, 42, 99,
    0, 2, 149, 86, 72, 163, 166, 117, 116, 74, 125, 55, 90, 120, 114, 20, 182, 68, 69, 181,
    157, 38, 59, 179, 16, 177, 64, 57, 5, 58, 129, 13, 118, 124, 100, 169, 142, 155, 101,
    53, 82, 60, 151, 197,
)  # fmt: skip

# RAPF's configs/class/imagenet_r_<initial>-<increment>.yaml, as published (DESIGN.md §4); other
# splits take the first row.
RAPF_SPLITS = {  # (initial, increment): (batch size, beta, mix_bias, threshold, shrinkage)
    (20, 20): (64, 1, 0.7, 0.65, True),
    (10, 10): (60, 2, 0.7, 0.6, True),
    (40, 40): (64, 0.5, 0.7, 0.6, True),
    (100, 10): (64, 2, 0.7, 0.65, True),
    (100, 20): (64, 1, 0.7, 0.65, True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Variants: see `defaults.VARIANTS`."""
    c = defaults.benchmark("imagenet_r", 200, CLASS_ORDER, arg, RAPF_SPLITS, classes_per_batch=5)
    c.dataset.options.split_protocol = "rapf"  # RAPF's train/test list | "seeded" (no official one)
    c.dataset.options.seed = 0  # split_protocol=seeded: the seeded per-class split
    c.dataset.options.train_fraction = 0.8
    c.dataset.options.split_file = config_dict.placeholder(str)  # your own list (wins over both)
    return c
