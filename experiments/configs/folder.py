"""Your own images: one sub-folder per class, about 5 tasks, OpenAI CLIP ViT-B/16.

    python -m experiments.run --config folder --config.dataset.root=/data/flowers
    python -m experiments.run --config folder:inc3 --config.dataset.root=/data/flowers

Layout: ROOT/<class>/<image> (split 80/20 per class), or ROOT/train/<class>/ and ROOT/test/<class>/;
classes in sorted folder order, B0 Inc-k with k = ceil(C / 5), labelled `folder-<ROOT's name>`.
"""

import ml_collections

from experiments.configs import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """A class-per-folder tree at `dataset.root`; 0 below means "read it from the data"."""
    c = defaults.base_config()
    c.name = "folder-{root}"  # {root}: the name of the dataset.root folder
    c.dataset.name = "folder"
    c.dataset.source = "files"
    c.dataset.num_classes = 0  # the number of class sub-folders
    c.dataset.options.seed = 0  # of the 80/20 split when ROOT has no train/ and test/
    c.dataset.options.train_fraction = 0.8
    c.order = "identity"  # classes in sorted folder order; --config.order=seeded shuffles
    c.class_order = ()
    defaults.b0(c, 0)  # increment 0: ceil(C / 5) classes per task; initial 0: the same (B0)
    return defaults.parse_arg(arg).apply(c)
