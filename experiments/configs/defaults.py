"""Shared defaults of every experiment: `method_config()` plus dataset, model, prompt, run fields.

    python -m experiments.run --config cifar100      # the dataset files import this one

Run-time defaults are typed placeholders (None), so `--config.x=y` still type-checks them.
"""

import dataclasses
import re
from typing import NamedTuple

import ml_collections
from ml_collections import config_dict

from calfuse_jax import config
from calfuse_jax.config import METHODS
from calfuse_jax.data.registry import SOURCES
from calfuse_jax.preprocess import PREPROCESS_PATHS

DEFAULT_TEMPLATES = ("a good photo of a {}.",)

ORDERS = ("fixed", "seeded", "identity")
# The `--config NAME:variant,variant` tokens every config takes.
VARIANTS = (
    ("inc<k>", "k classes per task (B0 stays B0)"),
    ("b0", "the first task as large as the others"),
    ("b<n>", "a first task of n classes"),
    ("seeded", "the PyCIL class order, seed 1993"),
    (", ".join(METHODS), "the method"),
    ("smoke", "1 epoch, 5 images per class: checks the plumbing in seconds"),
)


# Every experiment field besides `method_config()`'s: dotted name -> (default, rule).
FIELDS = {
    "name": ("default", None),  # names the default workdir: runs/<name>-<method>
    "dataset.name": ("cifar100", None),  # a name known to calfuse_jax.data.registry, or synthetic
    "dataset.source": ("auto", SOURCES),
    "dataset.root": (config_dict.placeholder(str), None),  # your copy (else the data folder)
    "dataset.data_dir": (config_dict.placeholder(str), None),  # TFDS data_dir (source=tfds)
    "dataset.download": (True, None),  # fetch missing archives (or let TFDS prepare them)
    "dataset.mirror": (config_dict.placeholder(str), None),  # None: $CALFUSE_MIRROR, else public
    "dataset.train_split": ("train", None),
    "dataset.test_split": ("test", None),
    "dataset.num_classes": (100, "x >= 0"),  # 0: the number of class folders (image datasets)
    "dataset.max_per_class": (0, "x >= 0"),  # >0 keeps the first n images of each class per split
    # load_dataset(**options), the None values left out
    "dataset.options": (ml_collections.ConfigDict(), None),
    "model.name": ("openai/clip-vit-base-patch16", None),  # hub id, folder or "random:<variant>"
    "model.variant": ("ViT-B/16", None),  # a key of clip.VARIANTS: the weights' architecture
    "model.image_size": (config_dict.placeholder(int), "x >= 1"),  # None: the checkpoint's own
    "model.seed": (0, "x >= 0"),  # weights seed for "random:<variant>"
    "prompt.templates": (DEFAULT_TEMPLATES, None),
    "prompt.underscores_to_spaces": (True, None),
    # fixed: `class_order`; seeded: np.random.seed(order_seed).permutation(C) (PyCIL); identity
    "order": ("fixed", ORDERS),
    "order_seed": (1993, "x >= 0"),
    "class_order": (tuple(range(100)), "x >= 0"),
    "seeds": ("0", None),  # "0,1,2" or "0-2": each seed into workdir/seed_k, plus mean +- std
    "features.batch_size": (256, "x >= 1"),
    # host (threads), device (in the jitted encoder; one image size) or auto: equal pixels
    "features.preprocess": ("auto", PREPROCESS_PATHS),
    # None: $CALFUSE_CACHE, else ~/.cache/calfuse_jax
    "cache_dir": (config_dict.placeholder(str), None),
    "progress": (True, None),
    # outputs.*: no result changes, so a resume may flip them (calfuse_jax.rundir.RESUME_SAFE).
    "outputs.plots": (True, None),  # accuracy_curve.png, accuracy_matrix.png
    "outputs.tensorboard": (True, None),  # tensorboard/ event files
    # Seeds (and grid cells) as one vmapped program (calfuse_jax.seeds); auto: not on a CPU.
    "outputs.seeds_together": ("auto", ("auto", "true", "false")),
}
OPTION_RULES = {
    "dataset.options.seed": "x >= 0",
    "dataset.options.train_fraction": "0 < x < 1",
    "dataset.options.num_per_class": "x >= 1",
    "dataset.options.image_size": "x >= 1",
}
RULES = {**config.RULES, **config.rules_of(FIELDS), **OPTION_RULES}


def base_config() -> ml_collections.ConfigDict:
    """Every field an experiment reads (`method_config()` and `FIELDS`), CIFAR-100-like."""
    return config.build(FIELDS, config.method_config())


class RapfSplit(NamedTuple):
    """RAPF's settings of one split (`configs/class/<dataset>_<initial>-<increment>.yaml`); its
    other values (15 epochs, lr 1e-3, milestones (4, 10), ridge 1e-4, margin 0.1) are
    `method_config()`'s defaults."""

    batch_size: int  # `train_batch_size` (its `batch_size` is the evaluation loader's)
    beta: float  # pseudo.beta
    mix_bias: float  # fusion.mix_bias
    threshold: float  # pseudo.hard_threshold
    shrinkage: bool  # stats.shrinkage


def benchmark(
    name: str, num_classes: int, class_order, arg: str | None, splits: dict, classes_per_batch: int
) -> ml_collections.ConfigDict:
    """`base_config()` for the benchmark `name` with the variant `arg`: B0 with the increment of
    the first key of `splits` unless `arg` picks a split, and RAPF's values of that split (else of
    the first): `(initial, increment) -> (train_batch_size, beta, mix_bias, threshold, shrinkage)`
    from RAPF's YAML configs (their other values are `method_config()`'s). K: `classes_per_batch`.
    """
    c = base_config()
    c.name = c.dataset.name = name
    c.dataset.num_classes = num_classes
    c.class_order = tuple(class_order)
    main = next(iter(splits))
    parse_arg(arg).apply(b0(c, main[1]))
    split = RapfSplit(*splits.get((c.continual.initial, c.continual.increment), splits[main]))
    c.train.batch_size = split.batch_size
    c.pseudo.beta = float(split.beta)
    c.fusion.mix_bias = float(split.mix_bias)
    c.pseudo.hard_threshold = float(split.threshold)
    c.stats.shrinkage = bool(split.shrinkage)
    c.pseudo.classes_per_batch = int(classes_per_batch)
    return c


def b0(c: ml_collections.ConfigDict, increment: int) -> ml_collections.ConfigDict:
    """B0 Inc-k: every task, the first included, brings `increment` classes."""
    c.continual.initial = increment
    c.continual.increment = increment
    return c


@dataclasses.dataclass(frozen=True)
class Variant:
    """The shared variants of `--config NAME:variant,...` (see VARIANTS)."""

    inc: int | None = None
    b: int | None = None  # b0: the first task as large as the others
    seeded: bool = False
    method: str | None = None
    smoke: bool = False

    def apply(self, c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """Sets the fields of `c` the variant names (the step first, then the first task)."""
        if self.inc is not None:
            if c.continual.initial == c.continual.increment:  # keep B0 while changing the step
                c.continual.initial = self.inc
            c.continual.increment = self.inc
        if self.b is not None:
            c.continual.initial = self.b or c.continual.increment
        if self.seeded:
            c.order = "seeded"
        if self.method:
            c.method = self.method
        if self.smoke:
            c.train.epochs = 1
            c.dataset.max_per_class = 5
        return c


def parse_arg(arg: str | None) -> Variant:
    """`"b50,inc10,rapf"` -> `Variant(inc=10, b=50, method="rapf")`; each token at most once."""
    fields = {}
    for token in (t.strip() for t in (arg or "").split(",") if t.strip()):
        number = re.fullmatch(r"(inc|b)(\d+)", token)
        if number:
            key, value = number[1], int(number[2])
        elif token in METHODS:
            key, value = "method", token
        elif token in ("seeded", "smoke"):
            key, value = token, True
        else:
            known = ", ".join(name for name, _ in VARIANTS)
            raise ValueError(
                f"unknown config variant {token!r}; known variants: {known} "
                "(comma-separated, e.g. 'b50,inc10')"
            )
        if key in fields:
            raise ValueError(f"config variant {token!r} repeats {key!r}; give it once")
        fields[key] = value
    return Variant(**fields)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The defaults alone (CIFAR-100 B0 Inc10 shape); prefer a dataset config."""
    return parse_arg(arg).apply(base_config())
