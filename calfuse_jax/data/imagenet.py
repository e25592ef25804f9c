"""ImageNet layouts: ImageNet-R from its tarball and ImageNet-2012 class subsets (ImageNet-100).

Both are class-per-folder trees keyed by WordNet ids (`n01443537`); labels follow the wnid order
of `class_names.IMAGENET_R` / `class_names.IMAGENET100` (or the user's own wnid list).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from calfuse_jax.data import class_names as names_lib
from calfuse_jax.data.download import Resource
from calfuse_jax.data.images import (
    IMAGE_EXTENSIONS,
    DatasetEntry,
    FileDataset,
    class_listing,
    content_hash,
    list_class_folders,
    missing_data_error,
    read_split_file,
    seeded_class_split,
    subset,
    train_or_test,
)
from calfuse_jax.data.tfds_source import TfdsSpec

IMAGENET_R_HELP = """Download https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar, unpack:
    tar -xf imagenet-r.tar -C DATA_ROOT      # gives DATA_ROOT/imagenet-r/<wnid>/*.jpg (200 folders)
then pass root=DATA_ROOT (or DATA_ROOT/imagenet-r); without root= the archive is fetched into the
data folder (calfuse_jax.paths.data_root). Or prepare the TFDS dataset `imagenet_r`."""


def imagenet_r(
    root, split: str, *, train_fraction: float = 0.8, seed: int = 0, split_file=None
) -> FileDataset:
    """ImageNet-R from its tarball layout (`imagenet-r/<wnid>/*.jpg`, 200 wnid folders).

    Split: `split_file` (see `images.read_split_file`), else the seeded per-class split.
    """
    root, split = os.fspath(root), train_or_test(split, name="imagenet_r")
    if os.path.isdir(os.path.join(root, "imagenet-r")):
        root = os.path.join(root, "imagenet-r")
    if not os.path.isdir(root):
        raise missing_data_error("imagenet_r", f"folder {root!r} does not exist", IMAGENET_R_HELP)
    table_wnids = names_lib.wnids(names_lib.IMAGENET_R)
    folders = list_class_folders(root)
    missing = [w for w in table_wnids if w not in folders]
    if missing:
        raise missing_data_error(
            "imagenet_r",
            f"{len(missing)} of the 200 class folders are missing or empty under {root!r} "
            f"(first: {missing[:5]}); the download may be partial",
            IMAGENET_R_HELP,
        )
    files, labels = class_listing(folders, table_wnids)
    full = FileDataset(root, files, labels, IMAGENET_R.names, description="imagenet_r/all/files")
    if split_file is not None:
        return _apply_split_file(full, split_file, split, f"imagenet_r/{split}/files/split_file")
    train, test = seeded_class_split(full.labels, train_fraction=train_fraction, seed=seed)
    keep = train if split == "train" else test
    return subset(full, keep, f"imagenet_r/{split}/files/seed={seed},frac={train_fraction}")


def _apply_split_file(dataset: FileDataset, split_file, split: str, description: str):
    wanted = read_split_file(split_file, split)  # entries with or without "imagenet-r/"
    index = {f: i for i, f in enumerate(dataset.files)}
    keep = []
    for entry in sorted(wanted):
        key = entry if entry in index else entry.split("/", 1)[-1]
        if key not in index:
            raise ValueError(f"split file {split_file!r} names {entry!r}, not found under the root")
        keep.append(index[key])
    return subset(dataset, np.sort(np.asarray(keep, dtype=np.int64)), description)


def imagenet_help(root) -> str:
    """What to download for ImageNet-100 and where it goes (`root`: given, or the data folder's)."""
    return f"""\
ImageNet-2012 is never downloaded automatically: its licence allows downloads only from
image-net.org after signing up (https://image-net.org/download-images.php). Download
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar and unpack them as
    {root}/train/<wnid>/*.JPEG   (the train tar holds one tar per class: unpack each)
    {root}/val/<wnid>/*.JPEG     (or the 50,000 flat ILSVRC2012_val_*.JPEG files,
labelled by TFDS's validation_labels.txt)
(the 100 classes of ImageNet-100 are enough; an optional LOC_synset_mapping.txt beside
train/ names the classes), then run again; a copy elsewhere: pass root=DIR
(--config.dataset.root=DIR). Or prepare the TFDS dataset `imagenet2012`."""


def _imagenet_val_labels() -> list[str]:
    """wnid of ILSVRC2012_val_00000001..50000 from the file TFDS ships with its builder."""
    import tensorflow_datasets as tfds  # noqa: PLC0415  (only needed for flat val folders)

    path = os.path.join(
        os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "validation_labels.txt"
    )
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def imagenet_subset(
    root, split: str, *, wnids: Sequence[str] | None = None, class_file=None, name="imagenet100"
) -> FileDataset:
    """An ImageNet-2012 class subset, labels in the order of `wnids` (default ImageNet-100) or
    of `class_file` (one wnid per line, first token); `name` names it in errors and identity."""
    if class_file is not None:
        with open(class_file, encoding="utf-8") as f:
            wnids = [line.split()[0] for line in f if line.strip()]
    wnids = list(wnids or names_lib.wnids(names_lib.IMAGENET100))
    split = train_or_test(split, name=name)
    split_dir = os.path.join(os.fspath(root), "train" if split == "train" else "val")
    if not os.path.isdir(split_dir):
        problem = f"folder {split_dir!r} does not exist"
        raise missing_data_error(name, problem, imagenet_help(root))
    files, labels = _imagenet_listing(split_dir, wnids, name)
    table = dict(names_lib.IMAGENET100)
    mapping_file = os.path.join(os.fspath(root), "LOC_synset_mapping.txt")
    if os.path.exists(mapping_file):
        table.update(names_lib.synset_names(mapping_file))
    names = [table.get(w, w) for w in wnids]
    description = f"{name}/{split}/files/{content_hash(*wnids)}"
    return FileDataset(split_dir, files, labels, names, description=description)


def _imagenet_listing(split_dir: str, wnids: list[str], name: str):
    root = os.path.dirname(split_dir)
    folders = list_class_folders(split_dir)
    if not folders:  # flat validation folder
        flat = sorted(f for f in os.listdir(split_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        truth, position = _imagenet_val_labels(), {w: i for i, w in enumerate(wnids)}
        wnid_of = {f: truth[int(f.rsplit("_", 1)[-1].split(".")[0]) - 1] for f in flat}
        chosen = [(f, position[w]) for f, w in wnid_of.items() if w in position]
        if not chosen:
            problem = f"no images of the classes in {split_dir!r}"
            raise missing_data_error(name, problem, imagenet_help(root))
        return [f for f, _ in chosen], [y for _, y in chosen]
    missing = [w for w in wnids if w not in folders]
    if missing:
        raise missing_data_error(
            name,
            f"{len(missing)} of {len(wnids)} class folders missing or empty in {split_dir!r} "
            f"(first: {missing[:5]})",
            imagenet_help(root),
        )
    return class_listing(folders, wnids)


IMAGENET_R = DatasetEntry(
    "imagenet_r",
    "ImageNet-R, 200 classes, 30,000 renditions; RAPF's train/test list (split_protocol='rapf'), "
    "a seeded 80/20 per-class split ('seeded') or your split_file",
    imagenet_r,
    options=("split_protocol", "seed", "train_fraction", "split_file"),
    names=names_lib.names(names_lib.IMAGENET_R),
    # TFDS's imagenet_r: one `test` split in ImageNet-1k labels, kept by wnid and split seeded.
    tfds=TfdsSpec(
        "imagenet_r", {"train": "test", "test": "test"}, names_lib.wnids(names_lib.IMAGENET_R),
        seeded_split=True,
    ),
    # sha256 from tensorflow_datasets' datasets/imagenet_r/checksums.tsv.
    archive=Resource(
        "imagenet-r.tar",
        "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
        "18c6bf493b39a0d975d48e587437f562caab9c52ae6327dcfa9dd8eb54aa1b52",
        "sha256",
        "imagenet-r",
    ),
    # RAPF's ImageNet-R train/test list at commit 81d41df (`train` and `test` sections).
    split_lists={
        "rapf": Resource(
            "imgr_train_test_split.txt",
            "https://raw.githubusercontent.com/linlany/RAPF/81d41dfb2e6f0c856c8ca520c1b35bd6ef0ba883/"
            "imgr_split/imgr_train_test_split.txt",
            "ecf0b2e74696f38d0180ab60cf632a9cb417b5522df20d57bc587911e3b59f81",
            "sha256",
        )
    },
)  # fmt: skip

IMAGENET100 = DatasetEntry(
    "imagenet100",
    "ImageNet-100 (first 100 ImageNet-1k classes by wnid), train / val",
    imagenet_subset,
    options=("class_file", "wnids"),
    names=names_lib.names(names_lib.IMAGENET100),
    tfds=TfdsSpec(
        "imagenet2012", {"train": "train", "test": "validation"},
        names_lib.wnids(names_lib.IMAGENET100),
        manual="ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in MANUAL_DIR, and add "
        "--manual_dir=MANUAL_DIR",
    ),
    data_folder="imagenet",  # never fetched (licence): the user unpacks it there, or passes root=
)  # fmt: skip
