"""From a config to the input of `run_continual`: weights, images, cached features, class order.

Every process of a multi-process run calls `prepare` (the encoder runs on the global mesh); the
feature cache and a random-weight checkpoint are written by process 0 only.
"""

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any

import ml_collections
import numpy as np

from calfuse_jax import paths
from calfuse_jax.data.images import ImageDataset
from calfuse_jax.data.protocol import TaskSplit, make_split, seeded_order
from calfuse_jax.data.stream import FeatureStream
from calfuse_jax.feature_cache import checksums_match, weights_id, write_checksums
from calfuse_jax.files import share_like_open, temp_dir, waiting_lock
from experiments.configs import validate

log = logging.getLogger(__name__)

DATA_FLAGS = (
    "On the command line: root= is --config.dataset.root=PATH, data_dir= is "
    "--config.dataset.data_dir=DIR, source= is --config.dataset.source=files|tfds. "
    "`python -m experiments.run --config demo` needs no data and no network."
)
WEIGHTS_FLAGS = (
    "On the command line, pass a local CLIP folder with --config.model.name=/path/to/folder "
    "(config.json + model.safetensors + vocab.json + merges.txt), or run once with network access "
    "to fill the Hugging Face cache. `python -m experiments.run --config demo` needs no weights."
)


class UserError(Exception):
    """An expected problem the user can fix (missing files, offline, wrong path): no traceback."""


@dataclasses.dataclass
class Prepared:
    """What a run needs besides the config: text_features is float32 [C_dataset, D] by dataset
    label, logit_scale the checkpoint's exp(logit_scale) (None: the config's)."""

    stream: FeatureStream
    text_features: np.ndarray
    logit_scale: float | None
    provenance: dict


def cache_dir_of(config: ml_collections.ConfigDict) -> pathlib.Path:
    """config.cache_dir, else $CALFUSE_CACHE, else ~/.cache/calfuse_jax (`paths.cache_root`)."""
    return paths.cache_root(config.cache_dir)


def class_order_of(config: ml_collections.ConfigDict, num_classes: int) -> np.ndarray:
    """int [C]: the dataset label at each position (config.order: fixed | seeded | identity)."""
    if config.order == "fixed":
        order = np.asarray(config.class_order, dtype=np.int64)
    elif config.order == "seeded":
        order = seeded_order(num_classes, config.order_seed)
    else:
        order = np.arange(num_classes)
    if sorted(order.tolist()) != list(range(num_classes)):
        raise UserError(
            f"the class order lists {len(order)} labels but the dataset has {num_classes} "
            "classes; set --config.order=seeded or give a full --config.class_order"
        )
    return order


def split_hash(split: TaskSplit, *identities: Any) -> str:
    """sha256 over the class order, the task bounds and the image lists' identities."""
    data = [str(i) for i in identities]
    payload = dict(class_order=split.class_order.tolist(), bounds=split.bounds.tolist(), data=data)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def with_data_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` (a copy when anything changes) with `{root}` in `name`, `dataset.num_classes=0`,
    `continual.increment=0` (ceil(classes / 5)) and `continual.initial=0` (B0) read from the
    data. Idempotent."""
    d, c = config.dataset, config.continual
    if "{root}" not in config.name and d.num_classes and c.initial and c.increment:
        return config
    if d.root is None and ("{root}" in config.name or d.name == "folder"):
        raise UserError(
            f"config {config.name.replace('-{root}', '')!r} needs your image folder: pass "
            "--config.dataset.root=DIR, where DIR holds one sub-folder of images per class "
            "(or DIR/train/<class>/ and DIR/test/<class>/)"
        )
    config = copy.deepcopy(config)
    if "{root}" in config.name:
        config.name = config.name.replace("{root}", pathlib.Path(d.root).expanduser().name)
    if not d.num_classes:
        config.dataset.num_classes = len(load_split(config, d.train_split).class_names)
        log.info("%s: %d classes", d.root or d.name, config.dataset.num_classes)
    if not c.increment:
        config.continual.increment = max(1, -(-config.dataset.num_classes // 5))
    if not c.initial:
        config.continual.initial = config.continual.increment
    validate(config)  # e.g. an explicit initial larger than the classes found
    return config


def prepare(config: ml_collections.ConfigDict) -> Prepared:
    """Builds the feature stream of `config` (synthetic, or images through the feature cache)."""
    config = with_data_fields(config)
    if config.dataset.name == "synthetic":
        return _prepare_synthetic(config)
    return _prepare_images(config)


def _prepare_synthetic(config: ml_collections.ConfigDict) -> Prepared:
    from calfuse_jax.data.synthetic import make_synthetic_stream

    s = config.synthetic
    identity = f"synthetic:{json.dumps(s.to_dict(), sort_keys=True)}"
    order = class_order_of(config, config.dataset.num_classes)
    stream, text = make_synthetic_stream(
        num_classes=config.dataset.num_classes, dim=s.dim, train_per_class=s.train_per_class,
        test_per_class=s.test_per_class, initial=config.continual.initial,
        increment=config.continual.increment, seed=s.data_seed, noise=s.noise,
        close_pairs=s.close_pairs, pair_distance=s.pair_distance, text_noise=s.text_noise,
        distortion=s.distortion, class_order=order,
    )  # fmt: skip
    provenance = {
        "weights": None,
        "dataset": {"name": "synthetic", "identity": identity},
        "class_order": order.tolist(),
        "task_bounds": stream.split.bounds.tolist(),
        "split_hash": split_hash(stream.split, identity),
        "prompts": None,
    }
    return Prepared(stream, text, None, provenance)


def model_path(config: ml_collections.ConfigDict) -> str:
    """The checkpoint to load: a hub id, a folder, or a random one written into the cache."""
    name = config.model.name
    if not name.startswith("random:"):
        return name
    from calfuse_jax import clip
    from calfuse_jax.sharding import barrier, is_primary

    variant = name.split(":", 1)[1]
    if variant not in clip.VARIANTS:
        raise UserError(
            f"model {name!r}: unknown variant {variant!r}; choose one of {', '.join(clip.VARIANTS)}"
        )
    folder = cache_dir_of(config) / "models" / f"random-{variant}-seed{config.model.seed}"
    # Process 0 writes it under the file lock (one concurrent run at a time); the others wait.
    lock = waiting_lock(f"{folder}.lock", f"another process writing {folder}")
    with lock if is_primary() else contextlib.nullcontext():
        if is_primary() and not checksums_match(folder):  # unfinished, damaged or old
            with temp_dir(folder.parent, prefix=".tmp-") as tmp:
                clip.random_checkpoint(tmp, variant=variant, seed=config.model.seed)
                share_like_open(tmp)  # safetensors writes its file 0600
                write_checksums(tmp)
                shutil.rmtree(folder, ignore_errors=True)  # ours, regenerated identically
                os.replace(tmp, folder)
            log.info("wrote a random-weight %s CLIP checkpoint to %s", variant, folder)
    barrier("calfuse_random_checkpoint")
    return str(folder)


class FirstPerClass(ImageDataset):
    """The first `n` images of every class of `dataset` (smoke runs), with its own identity."""

    def __init__(self, dataset: ImageDataset, n: int):
        labels = np.asarray(dataset.labels)
        keep = [np.flatnonzero(labels == c)[:n] for c in np.unique(labels)]
        self._dataset, self._index = dataset, np.sort(np.concatenate(keep))
        self.labels = labels[self._index]
        self.class_names = dataset.class_names
        self.identity = f"{dataset.identity}|first{n}perclass"
        self.fixed_size = getattr(dataset, "fixed_size", None)

    def load(self, i: int) -> Any:
        return self._dataset.load(int(self._index[i]))

    def load_batch(self, indices) -> list:
        return self._dataset.load_batch([int(self._index[i]) for i in indices])


def load_split(config: ml_collections.ConfigDict, split: str) -> Any:
    """One split of the configured dataset (optionally the first n images per class)."""
    from calfuse_jax.data.download import DownloadError
    from calfuse_jax.data.registry import DATASETS, load_dataset

    d = config.dataset
    options = {k: v for k, v in d.options.to_dict().items() if v is not None}
    known = DATASETS[d.name].options if d.name in DATASETS else options
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(
            f"dataset {d.name!r} does not take the option(s) {', '.join(unknown)} that this "
            f"config sets (dataset.options.*, meant for another dataset); it takes "
            f"{', '.join(known) or 'none'}. For your own class-per-folder images use "
            "`--config folder --config.dataset.root=DIR`, or a config of your own without them."
        )
    where = {k: d[k] for k in ("root", "source", "data_dir", "download", "mirror")}
    try:
        dataset = load_dataset(
            d.name, split, cache_dir=config.cache_dir, progress=config.progress, **where, **options
        )
    except DownloadError as err:  # its one paragraph already names the URL, file and fix
        raise UserError(str(err)) from err
    except FileNotFoundError as err:
        raise UserError(f"{err}\n\n{DATA_FLAGS}") from err
    if d.max_per_class > 0:
        dataset = FirstPerClass(dataset, d.max_per_class)
    return dataset


def prompt_names(config: ml_collections.ConfigDict, class_names) -> list[str]:
    """Class names as they go into the prompt templates."""
    from calfuse_jax.data.class_names import prompt_names as clean

    return list(clean(class_names, underscores_to_spaces=config.prompt.underscores_to_spaces))


def _check_variant(config: ml_collections.ConfigDict, arch: Any) -> None:
    from calfuse_jax import clip

    expected = clip.VARIANTS.get(config.model.variant)
    fields = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers")
    if expected is not None and any(getattr(expected, f) != getattr(arch, f) for f in fields):
        log.warning(
            "model.variant=%r but %s has another architecture (%s); set --config.model.variant "
            "to the right name (the results are unaffected, the recorded variant is wrong)",
            config.model.variant,
            config.model.name,
            ", ".join(f"{f}={getattr(arch, f)}" for f in fields),
        )


def _load_clip(path: str) -> tuple:
    """(weights id, model, params, tokenizer) of the checkpoint `path`."""
    from calfuse_jax import clip

    try:
        return weights_id(path), *clip.from_pretrained(path), clip.load_tokenizer(path)
    except clip.HubUnreachableError as err:  # complete on its own, command-line fix included
        raise UserError(str(err)) from err
    except (clip.CheckpointError, FileNotFoundError) as err:
        raise UserError(f"{err}\n\n{WEIGHTS_FLAGS}") from err


def _prepare_images(config: ml_collections.ConfigDict) -> Prepared:
    from calfuse_jax import clip, features

    cache = cache_dir_of(config) / "features"
    # Data first: cheap to open, and its error names the files to fetch.
    train = load_split(config, config.dataset.train_split)
    test = load_split(config, config.dataset.test_split)
    path = model_path(config)
    weights, model, params, tokenizer = _load_clip(path)
    _check_variant(config, model.arch)
    image_size = config.model.image_size or model.image_size
    num_classes = len(train.class_names)
    if num_classes != config.dataset.num_classes:
        raise UserError(
            f"dataset {config.dataset.name!r} has {num_classes} classes but the config says "
            f"dataset.num_classes={config.dataset.num_classes}; fix the config"
        )
    encoded = []
    for name, dataset in (("train", train), ("test", test)):
        log.info("features of %s/%s: %d images", config.dataset.name, name, len(dataset))
        encoded += features.image_features(
            dataset, model, params, cache_dir=cache, weights_id=weights, image_size=image_size,
            batch_size=config.features.batch_size, progress=config.progress,
            preprocess_path=config.features.preprocess,
        )  # fmt: skip
    names = prompt_names(config, train.class_names)
    templates = tuple(config.prompt.templates)
    text = features.text_features(
        names, model, params, tokenizer, templates=templates, cache_dir=cache, weights_id=weights
    )
    order = class_order_of(config, num_classes)
    split = make_split(order, config.continual.initial, config.continual.increment)
    stream = FeatureStream(*encoded, split=split, class_names=tuple(names))
    provenance = {
        "weights": {"name": config.model.name, "path": path, "sha256": weights},
        "architecture": dataclasses.asdict(model.arch),
        "dataset": {
            "name": config.dataset.name,
            "train": {"identity": str(train.identity), "images": len(train)},
            "test": {"identity": str(test.identity), "images": len(test)},
        },
        "image_size": int(image_size),
        "class_order": order.tolist(),
        "task_bounds": split.bounds.tolist(),
        "split_hash": split_hash(split, train.identity, test.identity),
        "prompts": {"templates": list(templates), "class_names": names},
    }
    scale = float(clip.logit_scale(params))
    return Prepared(stream, np.asarray(text, np.float32), scale, provenance)
