"""The synthetic benchmark: CLIP-like features with a known answer, no images, no weights.

    python -m experiments.run --config synthetic
    python -m experiments.run --config synthetic:smoke          # seconds: 1 epoch, small stream
    python -m experiments.run --config synthetic --config.seeds=0,1,2 --config.method=rapf

`synthetic.*` are the arguments of `calfuse_jax.data.synthetic.make_synthetic_stream`.
"""

import ml_collections

from calfuse_jax import config
from experiments.configs import defaults

# dotted name -> (default, rule), as config.FIELDS.
FIELDS = {
    "synthetic.dim": (64, "x >= 1"),
    "synthetic.train_per_class": (100, "x >= 1"),
    "synthetic.test_per_class": (50, "x >= 1"),
    "synthetic.noise": (1.0, "x >= 0"),
    "synthetic.close_pairs": (4, "x >= 0"),
    "synthetic.pair_distance": (0.5, "x >= 0"),
    "synthetic.text_noise": (0.8, "x >= 0"),
    "synthetic.distortion": (1.5, "x >= 0"),
    "synthetic.data_seed": (0, "x >= 0"),  # the data stays fixed across run seeds
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Variants: see `defaults.VARIANTS`; `smoke` also shrinks the stream."""
    c = defaults.base_config()
    c.name = "synthetic"
    c.dataset.name = "synthetic"
    c.dataset.num_classes = 50
    c.model.name = "none"  # features are generated, no encoder
    c.model.variant = ""
    c.prompt.templates = ()
    c.order = "seeded"
    c.class_order = ()
    c.progress = False
    config.build(FIELDS, c)

    c.train.batch_size = 128
    # The design's schedule; 5 epochs left RAPF's random adapter undertrained in the method grid.
    c.train.epochs = 15
    c.train.milestones = (4, 10)
    c.ranpac.dim = 1_000  # 64-d features: 1,000 random features suffice (G: 4 MB, not 400)
    defaults.b0(c, 10)
    variant = defaults.parse_arg(arg)
    if variant.smoke:  # before the variant's own fields, so that inc7,smoke stays Inc7
        c.dataset.num_classes = 20
        c.synthetic.dim = 32
        c.synthetic.train_per_class = 30
        c.synthetic.test_per_class = 10
        defaults.b0(c, 5)
    return variant.apply(c)
