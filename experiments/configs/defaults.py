"""Shared defaults of every experiment: `method_config()` plus dataset, model, prompt, run fields.

    python -m experiments.run --config cifar100      # the dataset files import this one

Dataset files call `base_config()` and override a few fields; nothing here is dataset-specific
except the CIFAR-100 method values `method_config()` already carries. Fields whose default is
"decide at run time" are typed placeholders (None), so `--config.x=y` still type-checks them.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections
from ml_collections import config_dict

from calfuse_jax.config import method_config

# Continual-CLIP prompt (DESIGN.md §2); an ensemble averages the normalised embeddings.
DEFAULT_TEMPLATES = ("a good photo of a {}.",)

ORDERS = ("fixed", "seeded", "identity")
# The `--config NAME:variant,variant` tokens every config takes (see `apply_arg`).
VARIANTS = (
    ("inc<k>", "k classes per task (B0 stays B0)"),
    ("b0", "the first task as large as the others"),
    ("b<n>", "a first task of n classes"),
    ("seeded", "the PyCIL class order, seed 1993"),
    ("calfuse, rapf, finetune, zeroshot", "the method"),
    ("smoke", "1 epoch, 5 images per class: checks the plumbing in seconds"),
)
SOURCES = ("auto", "tfds", "files", "package", "procedural")


def base_config() -> ml_collections.ConfigDict:
    """Every field an experiment reads, with CIFAR-100-like defaults."""
    c = method_config()
    c.name = "default"  # names the default workdir: runs/<name>-<method>

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "cifar100"  # a name known to calfuse_jax.data.registry, or "synthetic"
    c.dataset.source = "auto"  # auto | tfds | files
    c.dataset.root = config_dict.placeholder(str)  # your copy of the files (else the data folder)
    c.dataset.data_dir = config_dict.placeholder(str)  # TFDS data_dir (source=tfds)
    # Files (source auto/files, no root): fetch the public archive into $CALFUSE_DATA (default
    # <cache root>/data) when it is not there; False makes missing data an error. With
    # source=tfds: let TFDS download and prepare (needs TensorFlow). ImageNet-2012 is never fetched.
    c.dataset.download = True
    # Base URL serving the archives instead of their public location (<mirror>/<file name>),
    # e.g. a local copy behind a proxy; None: $CALFUSE_MIRROR, else the public URLs.
    c.dataset.mirror = config_dict.placeholder(str)
    c.dataset.train_split = "train"
    c.dataset.test_split = "test"
    c.dataset.num_classes = 100
    c.dataset.max_per_class = 0  # >0 keeps the first n images of each class per split (smoke)
    # Reader options passed to load_dataset(**options) (None values are left out), e.g. the
    # ImageNet-R split seed; each dataset file lists the ones its reader takes.
    c.dataset.options = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    # Hub id, local Hugging Face CLIP folder, or "random:<variant>" (random weights, offline).
    c.model.name = "openai/clip-vit-base-patch16"
    c.model.variant = "ViT-B/16"  # a key of clip.VARIANTS: the architecture the weights must have
    c.model.image_size = config_dict.placeholder(int)  # None: the checkpoint's own size
    c.model.seed = 0  # weights seed for "random:<variant>"

    c.prompt = ml_collections.ConfigDict()
    c.prompt.templates = DEFAULT_TEMPLATES
    c.prompt.underscores_to_spaces = True

    # Class order: "fixed" uses `class_order` (the Continual-CLIP lists), "seeded" is the
    # PyCIL/C3Box family np.random.seed(order_seed).permutation(C), "identity" is 0..C-1.
    c.order = "fixed"
    c.order_seed = 1993
    c.class_order = tuple(range(100))

    # "0" runs once into the workdir; "0,1,2" runs each seed into workdir/seed_k plus mean +- std.
    c.seeds = "0"

    c.features = ml_collections.ConfigDict()
    c.features.batch_size = 256
    # None: $CALFUSE_CACHE, else ~/.cache/calfuse_jax. Shared by every method and seed.
    c.cache_dir = config_dict.placeholder(str)
    c.progress = True

    # What a run writes besides its metrics, summary and checkpoints. Neither changes a result,
    # so a resume may flip them (experiments.run.NOT_COMPARED); grids turn both off per cell.
    c.outputs = ml_collections.ConfigDict()
    c.outputs.plots = True  # accuracy_curve.png, accuracy_matrix.png
    c.outputs.tensorboard = True  # tensorboard/ event files
    return c


def b0(c: ml_collections.ConfigDict, increment: int) -> ml_collections.ConfigDict:
    """B0 Inc-k: every task, the first included, brings `increment` classes."""
    c.continual.initial = increment
    c.continual.increment = increment
    return c


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


def use_rapf_split(
    c: ml_collections.ConfigDict,
    table: dict[tuple[int, int], RapfSplit],
    default: tuple[int, int],
    classes_per_batch: int,
) -> ml_collections.ConfigDict:
    """Sets RAPF's values of the split `(continual.initial, continual.increment)` from `table`.

    A split RAPF publishes no config for takes the values of `default` (the dataset's main
    split). `classes_per_batch` is K, which RAPF's main.py picks from the dataset and increment.
    Call it after `apply_arg`, so that a variant such as `b50,inc10` picks its own row; a later
    `--config.continual.*` override does not re-pick (use the variant).
    """
    split = table.get((c.continual.initial, c.continual.increment), table[default])
    c.train.batch_size = split.batch_size
    c.pseudo.beta = float(split.beta)
    c.fusion.mix_bias = float(split.mix_bias)
    c.pseudo.hard_threshold = float(split.threshold)
    c.stats.shrinkage = bool(split.shrinkage)
    c.pseudo.classes_per_batch = int(classes_per_batch)
    return c


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Shared variants, comma-separated: `inc<k>`, `b0`, `b<n>` (first task of n classes),
    `seeded` (PyCIL order, seed 1993), `rapf` / `finetune` / `zeroshot` (method), `smoke`
    (1 epoch, 5 images per class: checks the plumbing, not the numbers).

    Example: `--config imagenet_r:b100,inc20,rapf`.
    """
    if not arg:
        return c
    for token in (t.strip() for t in arg.split(",") if t.strip()):
        if token.startswith("inc") and token[3:].isdigit():
            increment = int(token[3:])
            if c.continual.initial == c.continual.increment:  # keep B0 while changing the step
                c.continual.initial = increment
            c.continual.increment = increment
        elif token == "b0":
            c.continual.initial = c.continual.increment
        elif token.startswith("b") and token[1:].isdigit():
            c.continual.initial = int(token[1:])
        elif token == "seeded":
            c.order = "seeded"
        elif token in ("calfuse", "rapf", "finetune", "zeroshot"):
            c.method = token
        elif token == "smoke":
            c.train.epochs = 1
            c.dataset.max_per_class = 5
        else:
            known = ", ".join(name for name, _ in VARIANTS)
            raise ValueError(
                f"unknown config variant {token!r}; known variants: {known} "
                "(comma-separated, e.g. 'b50,inc10')"
            )
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The defaults alone (CIFAR-100 B0 Inc10 shape); prefer a dataset config."""
    return apply_arg(base_config(), arg)
