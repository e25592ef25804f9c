"""CUB-200-2011, B0 Inc20 (10 tasks of 20 classes), Continual-CLIP class order, CLIP ViT-B/16.

    python -m experiments.run --config cub200

Values from DESIGN.md §3 and RAPF (DESIGN.md §4); RAPF's YAML `margin: 0.2` is read by none of its
code, so the hinge margin stays 0.1.
"""

import ml_collections

from experiments.configs import defaults

# The public Continual-CLIP order (position -> dataset label), as RAPF and CalFuse use it.
CLASS_ORDER = (
    110, 54, 8, 122, 168, 136, 42, 139, 193, 46, 77, 34, 13, 99, 43, 147, 80, 182, 18, 127,
    36, 166, 140, 109, 124, 126, 102, 178, 123, 192, 181, 47, 143, 58, 64, 175, 95, 184,
    142, 20, 38, 125, 97, 83, 157, 90, 31, 159, 40, 41, 71, 189, 169, 185, 171, 84, 50, 152,
    132, 158, 196, 49, 149, 155, 63, 21, 3, 67, 66, 33, 57, 0, 108, 172, 162, 69, 107, 17,
    163, 183, 52, 1, 14, 35, 9, 22, 179, 116, 129, 130, 68, 70, 195, 6, 174, 167, 92, 197,
    134, 32, 115, 135, 101, 23, 89, 148, 128, 106, 76, 29, 2, 82, 55, 62, 60, 94, 138, 112,
    85, 131, 65, 19, 11, 120, 191, 25, 30, 100, 117, 186, 24, 61, 104, 113, 194, 119, 173,
    88, 111, 26, 39, 59, 161, 198, 74, 177, 5, 133, 10, 7, 81, 53, 93, 188, 154, 103, 44,
    91, 151, 150, 180, 87, 156, 28, 141, 199, 144, 45, 12, 164, 73, 48, 170, 37, 146, 75,
    16, 15, 27, 153, 176, 190, 79, 137, 114, 4, 56, 118, 51, 145, 78, 72, 187, 160, 121, 98,
    96, 105, 86, 165,
)  # fmt: skip

# RAPF's configs/class/cub200_20-20.yaml, its only CUB-200 split; every other split takes it.
RAPF_SPLITS = {  # (initial, increment): (batch size, beta, mix_bias, threshold, shrinkage)
    (20, 20): (32, 1, 0.8, 0.65, True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Variants: see `defaults.VARIANTS`."""
    return defaults.benchmark("cub200", 200, CLASS_ORDER, arg, RAPF_SPLITS, classes_per_batch=10)
