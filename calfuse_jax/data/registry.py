"""One entry point for every dataset: `load_dataset(name, split, root=..., source=...)`.

    ds = load_dataset("cifar100", "train")                  # fetched into the data folder once
    ds = load_dataset("cifar100", "train", root="~/data")   # your copy of the python archive
    ds = load_dataset("imagenet_r", "test", source="tfds", data_dir="~/tensorflow_datasets",
                      split_protocol="seeded")
    ds = load_dataset("shapes", "train")                     # procedural, no files

Sources: `files` (archives, class-per-folder trees: the user's under `root`, else the public
archives fetched on first use into `calfuse_jax.paths.data_root()`, see `data.download`), `tfds`
(a prepared array_record TFDS dataset, read without TensorFlow), `package` (Animal-MNIST inside
its wheel), `procedural` (shapes). `auto` picks `files` when `root` is given, else a prepared TFDS
dataset when it can serve the options, else the data folder (fetching what is missing, unless
download=False; ImageNet-2012 is never fetched: its error says what to download and where).
Every returned object has `labels`, `class_names`, `identity`, `len`, `load(i)` and
`load_batch(indices)` (see `data.images`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from calfuse_jax import paths
from calfuse_jax.data import animal_mnist as animal_lib
from calfuse_jax.data import cifar, cub, imagenet, images, tfds_source
from calfuse_jax.data import download as downloads


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """What `load_dataset` knows about one dataset name."""

    description: str
    sources: tuple[str, ...]  # the first is the default when `root` is given / nothing else works
    splits: tuple[str, ...]
    options: tuple[str, ...]  # keyword options accepted through **options
    files_help: str = ""


_SPLIT_OPTIONS = ("seed", "train_fraction")
DATASETS: dict[str, DatasetEntry] = {
    "cifar100": DatasetEntry(
        "CIFAR-100, 100 classes, 50,000 train / 10,000 test 32x32 images",
        ("files", "tfds"), ("train", "test"), ("label_cache",), cifar.CIFAR100_HELP,
    ),
    "imagenet_r": DatasetEntry(
        "ImageNet-R, 200 classes, 30,000 renditions; RAPF's train/test list (split_protocol="
        "'rapf'), a seeded 80/20 per-class split ('seeded') or your split_file",
        ("files", "tfds"), ("train", "test"),
        ("split_protocol", *_SPLIT_OPTIONS, "split_file", "label_cache"), imagenet.IMAGENET_R_HELP,
    ),
    "imagenet100": DatasetEntry(
        "ImageNet-100 (first 100 ImageNet-1k classes by wnid), train / val",
        ("files", "tfds"), ("train", "test"), ("class_file", "wnids", "label_cache"),
        imagenet.IMAGENET_HELP,
    ),
    "cub200": DatasetEntry(
        "CUB-200-2011 birds, 200 classes, official train/test split",
        ("files", "tfds"), ("train", "test"), ("label_cache",), cub.CUB_HELP,
    ),
    "animal_mnist": DatasetEntry(
        "Animal-MNIST, 10 animal silhouettes, 28x28 grayscale, from the animal-mnist wheel",
        ("package",), ("train", "test", "all"), _SPLIT_OPTIONS,
        f"    {animal_lib.INSTALL_LINE}",
    ),
    "shapes": DatasetEntry(
        "procedural coloured shapes, 10 classes, generated on demand (no files)",
        ("procedural",), ("train", "test"), ("seed", "num_per_class", "image_size"),
    ),
    "folder": DatasetEntry(
        "any class-per-folder tree ROOT/<class>/<image> (or ROOT/{train,test}/<class>/<image>)",
        ("files",), ("train", "test", "all"), ("class_names", *_SPLIT_OPTIONS),
        "    pass root=DIR holding one sub-folder of images per class (split by a seeded 80/20\n"
        "    per class), or DIR/train/<class>/ and DIR/test/<class>/",
    ),
}  # fmt: skip


def _files_reader(name: str) -> Callable:
    if name == "cifar100":
        return lambda root, split, **o: cifar.cifar100(root, split)
    if name == "imagenet_r":
        return imagenet.imagenet_r
    if name == "imagenet100":
        return imagenet.imagenet_subset
    if name == "cub200":
        return lambda root, split, **o: cub.cub200(root, split)
    return images.folder_split


def load_dataset(
    name: str,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    mirror: str | None = None,
    download_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **options,
) -> images.ImageDataset:
    """Opens dataset `name`'s `split` (see `DATASETS` for names, splits, sources and options).

    Args:
      name: cifar100 | imagenet_r | imagenet100 | cub200 | animal_mnist | shapes | folder.
      split: "train" or "test" ("val"/"validation" mean "test").
      root: the user's files (archive, folder tree); implies source="files".
      source: "auto", "files", "tfds", "package", "procedural".
      data_dir: TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
      download: files without root=: fetch the public archive (and ImageNet-R's split list) into
        `download_dir` when not there yet; False makes missing data an error. source="tfds":
        let TFDS download and prepare (needs TensorFlow for these builders).
      mirror: base URL serving the files instead of their public location (`<mirror>/<file>`);
        default $CALFUSE_MIRROR.
      download_dir: where fetched data lives (default `calfuse_jax.paths.data_root()`).
      progress: show download progress bars.
      **options: dataset options, e.g. split_protocol / seed / train_fraction / split_file for
        imagenet_r.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    entry = DATASETS[name]
    split = {"val": "test", "validation": "test"}.get(split, split)
    if split not in entry.splits:
        raise ValueError(f"{name} has splits {entry.splits}; got {split!r}")
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise TypeError(f"{name} takes options {entry.options}; unknown: {unknown}")
    source = _pick_source(name, entry, source, root, data_dir, options)
    if source == "package":
        return animal_lib.animal_mnist(split, **options)
    if source == "procedural":
        return animal_lib.shapes(split, **options)
    if source == "tfds":
        kept = _tfds_options(options)
        return tfds_source.tfds_dataset(name, split, data_dir=data_dir, download=download, **kept)
    fetching = dict(mirror=mirror, download=download, progress=progress)
    folder = download_dir or paths.data_root()
    files_options = {k: v for k, v in options.items() if k not in ("label_cache", "split_protocol")}
    if name == "imagenet_r" and files_options.get("split_file") is None:
        files_options["split_file"] = _imagenet_r_split_file(options, folder, fetching)
    if root is None:
        root = _default_root(name, entry, folder, fetching)
    return _files_reader(name)(os.path.expanduser(os.fspath(root)), split, **files_options)


def _protocol(name: str, options: dict) -> str:
    """ImageNet-R's split: RAPF's published list unless told `split_protocol="seeded"`."""
    return options.get("split_protocol", "rapf" if name == "imagenet_r" else "seeded")


def _imagenet_r_split_file(options: dict, folder, fetching: dict):
    """RAPF's published list (fetched and checked like an archive), or None for the seeded split."""
    protocol = _protocol("imagenet_r", options)
    if protocol not in ("rapf", "seeded"):
        raise ValueError(f"imagenet_r split_protocol is 'rapf' or 'seeded', not {protocol!r}")
    if protocol == "seeded":
        return None
    return downloads.fetch(downloads.RESOURCES["imagenet_r_split"], folder, **fetching)


def _default_root(name: str, entry: DatasetEntry, folder, fetching: dict):
    """The data folder's copy of `name` (fetched first when it has a public archive)."""
    if name in downloads.RESOURCES:
        return downloads.ensure_extracted(downloads.RESOURCES[name], folder, **fetching)
    if name == "imagenet100":
        manual = os.path.join(os.fspath(folder), "imagenet")
        if os.path.isdir(manual):
            return manual
        raise images.missing_data_error(
            name, "no root= given and no ImageNet-2012 copy in the data folder",
            imagenet.imagenet_manual_help(manual),
        )  # fmt: skip
    raise images.missing_data_error(name, "source='files' needs root=", entry.files_help)


_TFDS_OPTIONS = ("seed", "train_fraction", "label_cache", "split_protocol")


def _tfds_options(options: dict) -> dict:
    """The options a TFDS source takes (its ImageNet-R split is the seeded one); else ValueError."""
    extra = sorted(set(options) - set(_TFDS_OPTIONS))
    if options.get("split_protocol", "seeded") != "seeded":
        extra.append(f"split_protocol={options['split_protocol']!r}")
    if extra:
        raise ValueError(
            f"{extra} only work with source='files'; TFDS gives ImageNet-R's seeded split only "
            "(split_protocol='seeded', --config.dataset.options.split_protocol=seeded)"
        )
    return {k: v for k, v in options.items() if k != "split_protocol"}


def _pick_source(name, entry, source, root, data_dir, options) -> str:
    if source not in ("auto", "files", "tfds", "package", "procedural"):
        raise ValueError(f"unknown source {source!r}; use auto, files, tfds, package, procedural")
    if source != "auto":
        if source not in entry.sources:
            raise ValueError(f"{name} can be read from {entry.sources}, not {source!r}")
        return source
    if root is not None or entry.sources[0] != "files" or "tfds" not in entry.sources:
        return entry.sources[0]
    if set(options) - set(_TFDS_OPTIONS) or _protocol(name, options) != "seeded":
        return "files"  # asks what only the files give: ImageNet-R's RAPF split, a split file
    spec = tfds_source.TFDS_SPECS[name]
    data_dir = os.fspath(data_dir or tfds_source.default_data_dir())
    if tfds_source.find_prepared(spec.tfds_name, data_dir) is not None:
        return "tfds"
    return "files"
