"""One entry point for every dataset: `load_dataset(name, split, root=..., source=...)`.

    ds = load_dataset("cifar100", "train")                  # fetched into the data folder once
    ds = load_dataset("cifar100", "train", root="~/data")   # your copy of the python archive
    ds = load_dataset("imagenet_r", "test", source="tfds", data_dir="~/tensorflow_datasets",
                      split_protocol="seeded")
    ds = load_dataset("shapes", "train")                     # procedural, no files

Each reader module declares its `images.DatasetEntry`; `DATASETS` collects them and `register`
adds one of your own. `auto` picks `files` when `root` is given, else a prepared TFDS dataset
when it can serve the options, else the data folder (fetching what is missing).
"""

from __future__ import annotations

import os

from calfuse_jax import paths
from calfuse_jax.data import animal_mnist, cifar, cub, imagenet, images, shapes, tfds_source
from calfuse_jax.data import download as downloads
from calfuse_jax.data.images import DatasetEntry

SOURCES = ("auto", "tfds", "files", "package", "procedural")
DATASETS: dict[str, DatasetEntry] = {e.name: e for e in (
    cifar.ENTRY, imagenet.IMAGENET_R, imagenet.IMAGENET100, cub.ENTRY, animal_mnist.ENTRY,
    shapes.ENTRY, images.FOLDER,
)}  # fmt: skip
_TFDS_OPTIONS = ("seed", "train_fraction", "split_protocol")  # split_protocol: "seeded" only
_BUILT_IN = frozenset(DATASETS)


def register(entry: DatasetEntry) -> DatasetEntry:
    """Adds a dataset of your own to `DATASETS` (again: replaces it); returns `entry`."""
    if entry.name in _BUILT_IN and DATASETS[entry.name] is not entry:
        raise ValueError(f"{entry.name!r} is a built-in dataset; give yours another name")
    DATASETS[entry.name] = entry
    return entry


def load_dataset(
    name: str,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    mirror: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    download_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **options,
) -> images.ImageDataset:
    """Opens dataset `name`'s `split`.

    Args:
      name: a key of `DATASETS` (the built-in ones, or one you `register`).
      split: "train" or "test" ("val"/"validation" mean "test"); some take "all".
      root: the user's files (archive, folder tree); implies source="files".
      source: one of `SOURCES`: "files" (archives and folder trees: `root`, else the public
        archive fetched into the data folder), "tfds" (a prepared TFDS dataset, read without
        TensorFlow), "package" (Animal-MNIST's wheel), "procedural" (shapes); "auto": see above.
      data_dir: TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
      download: fetch missing public files (False makes missing data an error; ImageNet-2012 is
        never fetched, its error says what to download); source="tfds": let TFDS prepare.
      mirror: base URL serving the files (`<mirror>/<file>`); default $CALFUSE_MIRROR.
      cache_dir: the cache root (`paths.cache_root`): TFDS label scans go to `tfds_labels/`.
      download_dir: where fetched data lives (default `paths.data_root(cache_dir)`).
      progress: show download progress bars.
      **options: the entry's options, e.g. split_protocol / seed / train_fraction / split_file.

    Raises ValueError for an unknown `name`, TypeError for options the dataset does not take.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    entry = DATASETS[name]
    split = images.train_or_test(split, entry.splits, name)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise TypeError(f"{name} takes options {entry.options}; unknown: {unknown}")
    source = _pick_source(entry, source, root, data_dir, options)
    if source == "tfds":
        kept = _tfds_options(entry, options)
        return tfds_source.tfds_dataset(
            entry, split, data_dir=data_dir, download=download, cache_dir=cache_dir, **kept
        )
    if source != "files":
        return entry.reader(split, **options)
    folder = download_dir or paths.data_root(cache_dir)
    fetch = dict(folder=folder, mirror=mirror, download=download, progress=progress)
    options = _split_file(entry, options, fetch)
    root = _default_root(entry, fetch) if root is None else root
    return entry.reader(os.path.expanduser(os.fspath(root)), split, **options)


def _protocol(entry: DatasetEntry, options: dict) -> str:
    """The split_protocol asked for: the first published list unless told, else "seeded"."""
    return options.get("split_protocol", next(iter(entry.split_lists), "seeded"))


def _split_file(entry: DatasetEntry, options: dict, fetch: dict) -> dict:
    """`options` with split_protocol turned into split_file (its published list, fetched)."""
    protocol = _protocol(entry, options)
    options = {k: v for k, v in options.items() if k != "split_protocol"}
    if protocol not in (*entry.split_lists, "seeded"):
        raise ValueError(
            f"{entry.name} split_protocol is one of {(*entry.split_lists, 'seeded')}, "
            f"not {protocol!r}"
        )
    if protocol != "seeded" and options.get("split_file") is None:
        options["split_file"] = downloads.fetch(entry.split_lists[protocol], **fetch)
    return options


def _default_root(entry: DatasetEntry, fetch: dict):
    """The data folder's copy of `entry` (fetched and unpacked first when it has an archive)."""
    if entry.archive is not None:
        return downloads.ensure_extracted(entry.archive, **fetch)
    if entry.data_folder:
        return os.path.join(os.fspath(fetch["folder"]), entry.data_folder)
    raise images.missing_data_error(entry.name, "source='files' needs root=", entry.files_help)


def _tfds_options(entry: DatasetEntry, options: dict) -> dict:
    extra, protocol = sorted(set(options) - set(_TFDS_OPTIONS)), _protocol(entry, options)
    if protocol != "seeded":
        extra.append(f"split_protocol={protocol!r}")
    if extra:
        raise ValueError(
            f"{extra} only work with source='files'; TFDS gives {entry.name}'s seeded split only "
            "(split_protocol='seeded', --config.dataset.options.split_protocol=seeded)"
        )
    return {k: v for k, v in options.items() if k != "split_protocol"}


def _pick_source(entry: DatasetEntry, source: str, root, data_dir, options: dict) -> str:
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; use {', '.join(SOURCES)}")
    if source != "auto":
        if source not in entry.sources:
            raise ValueError(f"{entry.name} can be read from {entry.sources}, not {source!r}")
        return source
    if root is not None or entry.tfds is None:
        return entry.source
    if set(options) - set(_TFDS_OPTIONS) or _protocol(entry, options) != "seeded":
        return "files"  # asks what only the files give: a published split list, a split file
    data_dir = os.fspath(data_dir or tfds_source.default_data_dir())
    return "files" if tfds_source.find_prepared(entry.tfds.tfds_name, data_dir) is None else "tfds"
