"""Offline demo: real images that need no download -> a tiny random-weight CLIP -> 5 tasks.

    python -m experiments.run --config demo
    python -m experiments.run --config demo:smoke               # a few seconds

The whole pipeline of a real benchmark with no network; random CLIP weights, so not a measure of
CalFuse (zero-shot is chance).
"""

import ml_collections

from experiments.configs import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """10 classes, B0 Inc2 (5 tasks); `smoke` keeps 20 images per class and 2 epochs."""
    c = defaults.base_config()
    c.name = "demo"
    c.dataset.name = "shapes"  # procedural images: no download, no extra package
    c.dataset.num_classes = 10
    c.dataset.options.num_per_class = 50
    c.dataset.options.image_size = 64
    c.model.name = "random:tiny"
    c.model.variant = "tiny"
    c.order = "identity"
    c.class_order = ()
    c.features.batch_size = 64
    # Small batches: ~100 steps per task (a random CLIP's features differ little by class).
    c.train.epochs = 15
    c.train.milestones = (10,)
    c.train.batch_size = 16
    c.pseudo.beta = 1.0
    c.pseudo.hard_threshold = 0.5
    defaults.b0(c, 2)
    variant = defaults.parse_arg(arg)
    variant.apply(c)
    if variant.smoke:
        c.dataset.max_per_class = 20
        c.train.epochs = 2
    return c
