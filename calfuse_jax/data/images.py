"""Image datasets on disk: the common dataset interface and the plain-file readers.

Every reader returns an object with the same small interface (`ImageDataset`):

    ds.labels       int64 [N], dataset labels (index into `ds.class_names`)
    ds.class_names  tuple[str], by label
    ds.identity     str, stable description for cache keys (dataset, split, source, hash of the
                    sorted relative file list and labels), the same on every machine
    len(ds); ds.load(i) -> uint8 [H, W, 3]; ds.load_batch(indices) -> list of arrays

Readers here take the layouts users already have: a class-per-folder tree (ImageNet-R tarball,
ImageNet `train/` and `val/`), CUB-200-2011's `images/` plus its text files. ImageNet-R has no
official split, so `imagenet_r` draws a seeded 80/20 split per class (documented in
`seeded_class_split`) unless the user passes a split file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from calfuse_jax.data import class_names as names_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageDataset:
    """Interface shared by all readers: labels, class names, identity, random access to images."""

    labels: np.ndarray
    class_names: tuple[str, ...]
    identity: str

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> np.ndarray:
        """Image `index` as uint8 [H, W, 3]."""
        raise NotImplementedError

    def load_batch(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Images at `indices`, each uint8 [H, W, 3] (sizes may differ)."""
        return [self.load(int(i)) for i in indices]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity}, classes={len(self.class_names)})"


def to_rgb(array: np.ndarray) -> np.ndarray:
    """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> uint8 [H, W, 3]."""
    array = np.asarray(array, dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        return np.ascontiguousarray(array[..., :3])
    return array


def decode_image(path_or_file) -> np.ndarray:
    """Decodes one image file (any PIL format, grayscale/palette/CMYK/alpha) to uint8 [H, W, 3]."""
    with Image.open(path_or_file) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def content_hash(*parts) -> str:
    """sha256 (hex, 16 chars) over strings, bytes and arrays, in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(str((part.dtype.str, part.shape)).encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, bytes):
            digest.update(part)
        else:
            digest.update(str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


class FileDataset(ImageDataset):
    """Images stored as files under `root`; `files` are paths relative to `root`."""

    def __init__(self, root, files, labels, class_names, *, description: str):
        self.root = os.fspath(root)
        self.files = tuple(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names)
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")
        listing = "\n".join(
            f"{f}\t{y}" for f, y in sorted(zip(self.files, self.labels.tolist(), strict=True))
        )
        self.identity = f"{description}/n={len(self.files)}/files={content_hash(listing)}"

    def load(self, index: int) -> np.ndarray:
        return decode_image(os.path.join(self.root, self.files[index]))


class ArrayDataset(ImageDataset):
    """Images held in memory as uint8 [N, H, W] or [N, H, W, C] (CIFAR, Animal-MNIST)."""

    def __init__(self, images, labels, class_names, *, description: str):
        self.images = np.asarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.identity = (
            f"{description}/n={len(self.labels)}/data={content_hash(self.images, self.labels)}"
        )

    def load(self, index: int) -> np.ndarray:
        return to_rgb(self.images[index])


def missing_data_error(dataset: str, problem: str, instructions: str) -> FileNotFoundError:
    """One message: what is wrong, then exactly which files to put where."""
    return FileNotFoundError(f"{dataset}: {problem}\n\nHow to fix:\n{instructions.strip()}")


def list_class_folders(root: str, extensions=IMAGE_EXTENSIONS) -> dict[str, list[str]]:
    """{folder name: sorted image file names} for every sub-folder of `root` holding images."""
    classes = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            files = sorted(
                f for f in os.listdir(entry.path) if f.lower().endswith(tuple(extensions))
            )
            if files:
                classes[entry.name] = files
    return classes


def folder_dataset(
    root,
    *,
    split: str = "all",
    class_names: Sequence[str] | None = None,
    name: str = "folder",
    folders: Sequence[str] | None = None,
) -> FileDataset:
    """A class-per-folder tree: `root/<class>/<image>`; labels follow sorted folder names.

    `class_names` (optional) replaces the folder names as names, in sorted-folder order.
    `folders` fixes the class list (and label order); a folder outside it is an error and a
    class without a folder simply has no images here (a test split lacking a class).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise missing_data_error(
            name, f"folder {root!r} does not exist", "Pass root=DIR with one sub-folder per class."
        )
    classes = list_class_folders(root)
    if not classes:
        raise missing_data_error(
            name,
            f"no class sub-folders with images under {root!r}",
            f"Lay the images out as {root}/<class name>/<image>.jpg (extensions: "
            f"{', '.join(IMAGE_EXTENSIONS)}).",
        )
    folders = list(folders or classes)
    stray = sorted(set(classes) - set(folders))
    if stray:
        raise ValueError(f"class folders {stray[:5]} in {root!r} are not among the classes")
    if class_names is not None and len(class_names) != len(folders):
        raise ValueError(f"{len(class_names)} class names for {len(folders)} class folders")
    files = [f"{c}/{f}" for c in folders for f in classes.get(c, [])]
    labels = [i for i, c in enumerate(folders) for _ in classes.get(c, [])]
    return FileDataset(
        root, files, labels, class_names or folders, description=f"{name}/{split}/files"
    )


def folder_split(
    root,
    split: str,
    *,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    train_fraction: float = 0.8,
) -> FileDataset:
    """A user's class-per-folder dataset, split three ways depending on the layout:

    `split="all"`: every image under `root/<class>/`. `root/train/<class>/` and
    `root/test/<class>/` (or `val/`) present: those, with the label order of `train/`. Otherwise
    the seeded per-class split of `root/<class>/` (`seeded_class_split(train_fraction, seed)`).
    """
    root = os.fspath(root)
    if split == "all":
        return folder_dataset(root, class_names=class_names)
    split = _train_or_test(split)
    subdirs = {"train": ["train"], "test": ["test", "val", "validation"]}[split]
    found = [d for d in subdirs if os.path.isdir(os.path.join(root, d))]
    if found and os.path.isdir(os.path.join(root, "train")):
        classes = list(list_class_folders(os.path.join(root, "train")))
        return folder_dataset(
            os.path.join(root, found[0]), split=split, class_names=class_names, folders=classes
        )
    full = folder_dataset(root, class_names=class_names)
    train, test = seeded_class_split(full.labels, train_fraction=train_fraction, seed=seed)
    keep = train if split == "train" else test
    return _subset(full, keep, f"folder/{split}/files/seed={seed},frac={train_fraction}")


def seeded_class_split(labels: np.ndarray, *, train_fraction: float = 0.8, seed: int = 0):
    """Per-class seeded split of item indices into (train, test), both sorted int64 arrays.

    For each class (items in their given order) a `numpy.random.default_rng(seed)` permutation
    (one generator, classes visited in increasing label order) puts the first
    `round(train_fraction * n_c)` items in train, the rest in test. Deterministic for a fixed
    file listing, seed and fraction; used for ImageNet-R and Animal-MNIST (no official split).
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        cut = int(round(train_fraction * len(members)))
        train.append(members[:cut])
        test.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def read_split_file(path) -> set[str]:
    """Relative image paths listed in a split file: first whitespace token of each line."""
    with open(path, encoding="utf-8") as f:
        entries = {line.split()[0].replace("\\", "/") for line in f if line.strip()}
    if not entries:
        raise ValueError(f"split file {path!r} lists no images")
    return entries


def _subset(dataset: FileDataset, keep: np.ndarray, description: str) -> FileDataset:
    return FileDataset(
        dataset.root,
        [dataset.files[i] for i in keep],
        dataset.labels[keep],
        dataset.class_names,
        description=description,
    )


def _apply_split_file(dataset: FileDataset, split_file, description: str) -> FileDataset:
    wanted = read_split_file(split_file)
    # Accept entries with or without a leading "imagenet-r/" folder.
    index = {f: i for i, f in enumerate(dataset.files)}
    keep = []
    for entry in sorted(wanted):
        key = entry if entry in index else entry.split("/", 1)[-1]
        if key not in index:
            raise ValueError(f"split file {split_file!r} names {entry!r}, not found under the root")
        keep.append(index[key])
    return _subset(dataset, np.sort(np.asarray(keep, dtype=np.int64)), description)


IMAGENET_R_HELP = """Download https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar, unpack:
    tar -xf imagenet-r.tar -C DATA_ROOT      # gives DATA_ROOT/imagenet-r/<wnid>/*.jpg (200 folders)
then pass root=DATA_ROOT (or DATA_ROOT/imagenet-r). Or prepare the TFDS dataset `imagenet_r`."""


def imagenet_r(
    root, split: str, *, train_fraction: float = 0.8, seed: int = 0, split_file=None
) -> FileDataset:
    """ImageNet-R from its tarball layout (`imagenet-r/<wnid>/*.jpg`, 200 wnid folders).

    Labels: index of the wnid in `class_names.IMAGENET_R` (sorted wnids). Split: `split_file`
    (a text file whose lines start with `<wnid>/<file>`; those images form this split) or the
    seeded per-class 80/20 split of `seeded_class_split(train_fraction, seed)`.
    """
    root = os.fspath(root)
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
    files = [f"{w}/{f}" for w in table_wnids for f in folders[w]]
    labels = [i for i, w in enumerate(table_wnids) for _ in folders[w]]
    names = names_lib.names(names_lib.IMAGENET_R)
    full = FileDataset(root, files, labels, names, description="imagenet_r/all/files")
    if split_file is not None:
        return _apply_split_file(full, split_file, f"imagenet_r/{split}/files/split_file")
    train, test = seeded_class_split(full.labels, train_fraction=train_fraction, seed=seed)
    keep = {"train": train, "test": test}[_train_or_test(split)]
    return _subset(
        full, keep, f"imagenet_r/{_train_or_test(split)}/files/seed={seed},frac={train_fraction}"
    )


def _train_or_test(split: str) -> str:
    aliases = {"train": "train", "test": "test", "val": "test", "validation": "test"}
    if split not in aliases:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    return aliases[split]


IMAGENET_HELP = """Put ImageNet-2012 (ILSVRC2012) under DATA_ROOT as
    DATA_ROOT/train/<wnid>/*.JPEG          (1000 or just the selected class folders)
    DATA_ROOT/val/<wnid>/*.JPEG            (validation sorted into class folders), or
    DATA_ROOT/val/ILSVRC2012_val_*.JPEG    (flat; labels come from TFDS's validation_labels.txt)
and pass root=DATA_ROOT. Optional: DATA_ROOT/LOC_synset_mapping.txt for class names. Or prepare
the TFDS dataset `imagenet2012` (manual download of the two ILSVRC2012 tars)."""


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
    """An ImageNet-2012 class subset (default: ImageNet-100 = the first 100 sorted wnids).

    Labels follow the order of `wnids` (default `class_names.IMAGENET100`). `class_file`: a
    text file with one wnid per line (first token) choosing another subset.
    """
    if class_file is not None:
        with open(class_file, encoding="utf-8") as f:
            wnids = [line.split()[0] for line in f if line.strip()]
    wnids = list(wnids or names_lib.wnids(names_lib.IMAGENET100))
    split = _train_or_test(split)
    split_dir = os.path.join(os.fspath(root), "train" if split == "train" else "val")
    if not os.path.isdir(split_dir):
        raise missing_data_error(name, f"folder {split_dir!r} does not exist", IMAGENET_HELP)
    files, labels = _imagenet_listing(split_dir, wnids, name)
    table = dict(names_lib.IMAGENET100)
    mapping_file = os.path.join(os.fspath(root), "LOC_synset_mapping.txt")
    if os.path.exists(mapping_file):
        table.update(names_lib.synset_names(mapping_file))
    names = [table.get(w, w) for w in wnids]
    return FileDataset(
        split_dir, files, labels, names, description=f"{name}/{split}/files/{content_hash(*wnids)}"
    )


def _imagenet_listing(split_dir: str, wnids: list[str], name: str):
    folders = list_class_folders(split_dir)
    if not folders:  # flat validation folder
        flat = sorted(f for f in os.listdir(split_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        truth = _imagenet_val_labels()
        position = {w: i for i, w in enumerate(wnids)}
        chosen = [
            (f, position[truth[int(f.rsplit("_", 1)[-1].split(".")[0]) - 1]])
            for f in flat
            if truth[int(f.rsplit("_", 1)[-1].split(".")[0]) - 1] in position
        ]
        if not chosen:
            raise missing_data_error(
                name, f"no images of the classes in {split_dir!r}", IMAGENET_HELP
            )
        return [f for f, _ in chosen], [y for _, y in chosen]
    missing = [w for w in wnids if w not in folders]
    if missing:
        raise missing_data_error(
            name,
            f"{len(missing)} of {len(wnids)} class folders missing or empty in {split_dir!r} "
            f"(first: {missing[:5]})",
            IMAGENET_HELP,
        )
    files = [f"{w}/{f}" for w in wnids for f in folders[w]]
    labels = [i for i, w in enumerate(wnids) for _ in folders[w]]
    return files, labels


CUB_HELP = """Download CUB_200_2011.tgz (https://data.caltech.edu/records/65de6-vp158), unpack:
    tar -xzf CUB_200_2011.tgz -C DATA_ROOT
giving DATA_ROOT/CUB_200_2011/{images/, images.txt, image_class_labels.txt,
train_test_split.txt, classes.txt}; pass root=DATA_ROOT (or DATA_ROOT/CUB_200_2011).
Or prepare the TFDS dataset `caltech_birds2011`."""


def _read_id_table(path) -> dict[int, str]:
    with open(path, encoding="utf-8") as f:
        return {int(a): b for a, b in (line.split(maxsplit=1) for line in f if line.strip())}


def cub200(root, split: str) -> FileDataset:
    """CUB-200-2011 from its own files; official train/test split (`train_test_split.txt`).

    Labels = class id - 1; names from `classes.txt` without the `001.` prefix.
    """
    root = os.fspath(root)
    if os.path.isdir(os.path.join(root, "CUB_200_2011")):
        root = os.path.join(root, "CUB_200_2011")
    needed = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"]
    absent = [f for f in needed + ["images"] if not os.path.exists(os.path.join(root, f))]
    if absent:
        raise missing_data_error("cub200", f"missing {absent} under {root!r}", CUB_HELP)
    images = _read_id_table(os.path.join(root, "images.txt"))
    classes = _read_id_table(os.path.join(root, "image_class_labels.txt"))
    is_train = _read_id_table(os.path.join(root, "train_test_split.txt"))
    class_table = _read_id_table(os.path.join(root, "classes.txt"))
    names = [class_table[i].strip().split(".", 1)[-1] for i in sorted(class_table)]
    want = 1 if _train_or_test(split) == "train" else 0
    ids = [i for i in sorted(images) if int(is_train[i].strip()) == want]
    files = [f"images/{images[i].strip()}" for i in ids]
    lost = [
        f for f in files[:: max(1, len(files) // 50)] if not os.path.exists(os.path.join(root, f))
    ]
    if lost:
        raise missing_data_error("cub200", f"image files missing, e.g. {lost[:3]}", CUB_HELP)
    labels = [int(classes[i].strip()) - 1 for i in ids]
    return FileDataset(
        root, files, labels, names, description=f"cub200/{_train_or_test(split)}/files"
    )
