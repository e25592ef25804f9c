"""Shared defaults of every experiment: `method_config()` plus dataset, model, prompt, run fields.

    python -m experiments.run --config cifar100      # the dataset files import this one

Dataset files call `base_config()` and override a few fields; nothing here is dataset-specific
except the CIFAR-100 method values `method_config()` already carries. Fields whose default is
"decide at run time" are typed placeholders (None), so `--config.x=y` still type-checks them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import ml_collections
from ml_collections import config_dict

from calfuse_jax import config
from calfuse_jax.config import METHODS
from calfuse_jax.data.registry import SOURCES
from calfuse_jax.preprocess import PREPROCESS_PATHS

# Continual-CLIP prompt (DESIGN.md §2); an ensemble averages the normalised embeddings.
DEFAULT_TEMPLATES = ("a good photo of a {}.",)

ORDERS = ("fixed", "seeded", "identity")
# The `--config NAME:variant,variant` tokens every config takes (see `parse_arg`).
VARIANTS = (
    ("inc<k>", "k classes per task (B0 stays B0)"),
    ("b0", "the first task as large as the others"),
    ("b<n>", "a first task of n classes"),
    ("seeded", "the PyCIL class order, seed 1993"),
    (", ".join(METHODS), "the method"),
    ("smoke", "1 epoch, 5 images per class: checks the plumbing in seconds"),
)


# Every experiment field besides `method_config()`'s, once: dotted name -> (default, rule), as
# `calfuse_jax.config.FIELDS` (a range for each number, the choices, or None).
FIELDS = {
    "name": ("default", None),  # names the default workdir: runs/<name>-<method>
    "dataset.name": ("cifar100", None),  # a name known to calfuse_jax.data.registry, or synthetic
    "dataset.source": ("auto", SOURCES),
    "dataset.root": (config_dict.placeholder(str), None),  # your copy (else the data folder)
    "dataset.data_dir": (config_dict.placeholder(str), None),  # TFDS data_dir (source=tfds)
    # Files (source auto/files, no root): fetch the public archive into $CALFUSE_DATA (default
    # <cache root>/data) when it is not there; False makes missing data an error. With
    # source=tfds: let TFDS download and prepare (needs TensorFlow). ImageNet-2012 is never fetched.
    "dataset.download": (True, None),
    # Base URL serving the archives instead of their public location (<mirror>/<file name>),
    # e.g. a local copy behind a proxy; None: $CALFUSE_MIRROR, else the public URLs.
    "dataset.mirror": (config_dict.placeholder(str), None),
    "dataset.train_split": ("train", None),
    "dataset.test_split": ("test", None),
    "dataset.num_classes": (100, "x >= 0"),  # 0: the number of class folders (image datasets)
    "dataset.max_per_class": (0, "x >= 0"),  # >0 keeps the first n images of each class per split
    # Reader options passed to load_dataset(**options) (None values are left out), e.g. the
    # ImageNet-R split seed; each dataset file sets the ones its reader takes (OPTION_RULES).
    "dataset.options": (ml_collections.ConfigDict(), None),
    # Hub id, local Hugging Face CLIP folder, or "random:<variant>" (random weights, offline).
    "model.name": ("openai/clip-vit-base-patch16", None),
    "model.variant": ("ViT-B/16", None),  # a key of clip.VARIANTS: the weights' architecture
    "model.image_size": (config_dict.placeholder(int), "x >= 1"),  # None: the checkpoint's own
    "model.seed": (0, "x >= 0"),  # weights seed for "random:<variant>"
    "prompt.templates": (DEFAULT_TEMPLATES, None),
    "prompt.underscores_to_spaces": (True, None),
    # Class order: "fixed" uses `class_order` (the Continual-CLIP lists), "seeded" is the
    # PyCIL/C3Box family np.random.seed(order_seed).permutation(C), "identity" is 0..C-1.
    "order": ("fixed", ORDERS),
    "order_seed": (1993, "x >= 0"),
    "class_order": (tuple(range(100)), "x >= 0"),
    # "0" runs once into the workdir; "0,1,2" runs each seed into workdir/seed_k plus mean +- std.
    "seeds": ("0", None),
    "features.batch_size": (256, "x >= 1"),
    # Where CLIP preprocessing runs: "host" (threads), "device" (uint8 images to the device,
    # resized inside the jitted encoder; sources whose images share one size, e.g. CIFAR) or
    # "auto" (device for those sources). Equal pixels either way; each path has its own cache,
    # and a resume may change it (calfuse_jax.rundir.RESUME_SAFE).
    "features.preprocess": ("auto", PREPROCESS_PATHS),
    # None: $CALFUSE_CACHE, else ~/.cache/calfuse_jax. Shared by every method and seed.
    "cache_dir": (config_dict.placeholder(str), None),
    "progress": (True, None),
    # What a run writes besides its metrics, summary and checkpoints. Neither changes a result,
    # so a resume may flip them (calfuse_jax.rundir.RESUME_SAFE); grids turn both off per cell.
    "outputs.plots": (True, None),  # accuracy_curve.png, accuracy_matrix.png
    "outputs.tensorboard": (True, None),  # tensorboard/ event files
    # Several --config.seeds (and grid cells that differ only in the step's floats or the
    # fusion) train together as one vmapped program (calfuse_jax.seeds): "true"; "false": one
    # after another; "auto": together on a GPU/TPU, one after another on a CPU, where the vmapped
    # program is slower (benchmarks/continual.py, 3 seeds: 89 s together, 74 s one by one).
    # Results agree within float error, so a resume may change it.
    "outputs.seeds_together": ("auto", ("auto", "true", "false")),
}
# The rules of the reader options the dataset files set (`dataset.options.*`).
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
    """RAPF's settings of one split, from its `configs/class/<dataset>_<initial>-<increment>.yaml`.

    Every RAPF config also has 15 epochs, lr 1e-3, milestones (4, 10) and lr x 0.1, and its code
    fixes the covariance ridge 1e-4 and the hinge margin 0.1: `method_config()`'s defaults.
    """

    batch_size: int  # `train_batch_size` (its `batch_size` is the evaluation loader's)
    beta: float  # pseudo.beta
    mix_bias: float  # fusion.mix_bias
    threshold: float  # pseudo.hard_threshold
    shrinkage: bool  # stats.shrinkage


def benchmark(
    name: str, num_classes: int, class_order, arg: str | None, splits: dict, classes_per_batch: int
) -> ml_collections.ConfigDict:
    """`base_config()` for the benchmark `name` (config and dataset) with the variant `arg`.

    Its classes come in the published `class_order`; the split is B0 with the increment of the
    first key of `splits` (`(initial, increment) -> RapfSplit`, the dataset's main split) unless
    the variant picks another, and takes RAPF's values of that split's row (a split RAPF
    publishes no config for: the first row; a later `--config.continual.*` override does not
    re-pick, use the variant). `classes_per_batch` is K, which RAPF's main.py picks per dataset.
    """
    c = base_config()
    c.name = c.dataset.name = name
    c.dataset.num_classes = num_classes
    c.class_order = tuple(class_order)
    main = next(iter(splits))
    parse_arg(arg).apply(b0(c, main[1]))
    split = splits.get((c.continual.initial, c.continual.increment), splits[main])
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
    """The shared variants of `--config NAME:variant,...`, parsed by `parse_arg` (see VARIANTS)."""

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
    """`"b50,inc10,rapf"` -> `Variant(inc=10, b=50, method="rapf")`; each token at most once.

    Example: `--config imagenet_r:b100,inc20,rapf`.
    """
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
