"""Offline demo: real images that need no download -> a tiny random-weight CLIP -> 5 tasks.

    python -m experiments.run --config demo
    python -m experiments.run --config demo:smoke               # a few seconds

What it is: the whole pipeline of a real benchmark (image reader, CLIP preprocessing, the frozen
encoder, the feature cache, 5 class-incremental tasks, results folder and plots) on a machine with
no network. What it is not: a measure of CalFuse. The CLIP weights are random (written by
`clip.random_checkpoint` into the cache), so the text embeddings carry no meaning and zero-shot is
chance; whatever the head learns comes from the images alone.
"""

from __future__ import annotations

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
    # 100 images per task: small batches give the head ~100 steps per task (the features of a
    # random CLIP differ little between classes, so a few steps learn nothing).
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
