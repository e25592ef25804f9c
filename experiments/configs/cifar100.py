"""CIFAR-100, B0 Inc10 (10 tasks of 10 classes), Continual-CLIP class order, OpenAI CLIP ViT-B/16.

    python -m experiments.run --config cifar100
    python -m experiments.run --config cifar100:inc5            # B0 Inc5, K = 4 (RAPF)

Values from DESIGN.md §3; training batch and K from RAPF (`RAPF_SPLITS`, DESIGN.md §4).
"""

import ml_collections

from experiments.configs import defaults

# The public Continual-CLIP order (position -> dataset label), as RAPF and CalFuse use it.
CLASS_ORDER = (
    87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96,
    18, 24, 32, 45, 88, 11, 4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12,
    37, 59, 25, 20, 80, 73, 1, 28, 6, 46, 62, 82, 53, 9, 31, 75, 38, 63, 33, 74, 27, 22, 36,
    3, 16, 21, 60, 19, 70, 90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56, 48, 71, 64,
    98, 13, 99, 7, 34, 55, 54, 26, 35, 39,
)  # fmt: skip

# RAPF's configs/class/cifar100_<initial>-<increment>.yaml; other splits take the first row.
RAPF_SPLITS = {  # (initial, increment): (batch size, beta, mix_bias, threshold, shrinkage)
    (10, 10): (100, 2, 0.6, 0.55, False),
    (50, 10): (100, 2, 0.6, 0.55, False),
    (50, 5): (50, 2, 0.6, 0.55, False),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Variants: see `defaults.VARIANTS`."""
    c = defaults.benchmark("cifar100", 100, CLASS_ORDER, arg, RAPF_SPLITS, classes_per_batch=2)
    if c.continual.increment == 5:  # RAPF's main.py: K = 4 for CIFAR-100 Inc5
        c.pseudo.classes_per_batch = 4
    return c
