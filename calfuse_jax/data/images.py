"""Image datasets on disk: the common interface (`ImageDataset`), the registry's `DatasetEntry`,
the class-per-folder readers, a safe NumPy unpickler and the seeded per-class split."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from calfuse_jax.data.download import Resource

if TYPE_CHECKING:
    from calfuse_jax.data.tfds_source import TfdsSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageDataset:
    """What every reader returns: int64 `labels` [N], `class_names` by label, `identity` (a
    location-free description for cache keys) and random access to uint8 [H, W, 3] images."""

    labels: np.ndarray
    class_names: tuple[str, ...]
    identity: str
    fixed_size: tuple[int, int] | None = None  # (H, W) of every image, when all share one

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


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """What `registry.load_dataset` knows about one dataset; each reader module declares its own.

    `reader(root, split, **options)` reads files: the user's `root=`, else the `archive` fetched
    into the data folder, else its `data_folder`. With source "package" or "procedural" it is
    `reader(split, **options)`. `tfds` adds a prepared TFDS dataset as a source.
    """

    name: str
    description: str
    reader: Callable[..., ImageDataset]
    source: str = "files"  # files | package | procedural: what `reader` reads
    splits: tuple[str, ...] = ("train", "test")
    options: tuple[str, ...] = ()  # keyword options passed on to `reader` (**options)
    names: tuple[str, ...] = ()  # class names by label, where fixed (TFDS labels are named by it)
    tfds: TfdsSpec | None = None
    archive: Resource | None = None
    # split_protocol -> a published list, passed as `split_file=` (the first is the default;
    # "seeded", no list, always exists)
    split_lists: dict[str, Resource] = dataclasses.field(default_factory=dict)
    data_folder: str = ""  # without an archive: the copy in the data folder read when no root=
    files_help: str = ""  # what root= must hold, when there is no default copy

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source, "tfds") if self.tfds else (self.source,)


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


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded; the message names the file and the fix."""


def decode_image(path_or_file, name: str | None = None) -> np.ndarray:
    """Decodes one image file (any PIL format and mode) to uint8 [H, W, 3]; `name` labels a file
    object in errors. Raises ImageDecodeError naming the file for anything PIL cannot decode."""
    if name is None:
        name = os.fspath(path_or_file) if isinstance(path_or_file, str | os.PathLike) else None
    try:
        with Image.open(path_or_file) as image:
            return pil_to_rgb(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib.error...
        raise ImageDecodeError(
            f"cannot decode the image {name or '<in-memory image>'!r}: "
            f"{type(error).__name__}: {error}. Replace that file with a readable image or move it "
            "out of the dataset folder, then run the same command again."
        ) from error


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image -> uint8 [H, W, 3]. 16-bit integer modes keep their high byte (PIL's own
    reduction for 16-bit RGB PNGs) where `convert("RGB")` would clip them at 255."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return to_rgb((wide >> 8).astype(np.uint8))
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


_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (core, name)
    for core in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def load_data_pickle(file, *, encoding: str = "bytes"):
    """Loads a data pickle (binary file object) rebuilding only NumPy arrays and plain
    containers, so a tampered archive cannot run code."""
    return _RestrictedUnpickler(file, encoding=encoding).load()


class FileDataset(ImageDataset):
    """Images stored as files under `root`; `files` are paths relative to `root`."""

    def __init__(self, root, files, labels, class_names, *, description: str):
        self.root = os.fspath(root)
        self.files = tuple(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names)
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")
        pairs = sorted(zip(self.files, self.labels.tolist(), strict=True))
        listing = "\n".join(f"{f}\t{y}" for f, y in pairs)
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
        digest = content_hash(self.images, self.labels)
        self.identity = f"{description}/n={len(self.labels)}/data={digest}"
        self.fixed_size = tuple(self.images.shape[1:3])

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
            names = os.listdir(entry.path)
            files = sorted(f for f in names if f.lower().endswith(tuple(extensions)))
            if files:
                classes[entry.name] = files
    return classes


def class_listing(
    classes: dict[str, list[str]], order: Sequence[str]
) -> tuple[list[str], list[int]]:
    """Paths `<class>/<file>` and labels (index in `order`) of `classes` ({folder: file names})."""
    files = [f"{c}/{f}" for c in order for f in classes.get(c, [])]
    labels = [i for i, c in enumerate(order) for _ in classes.get(c, [])]
    return files, labels


def folder_dataset(
    root,
    *,
    split: str = "all",
    class_names: Sequence[str] | None = None,
    name: str = "folder",
    folders: Sequence[str] | None = None,
) -> FileDataset:
    """A class-per-folder tree `root/<class>/<image>`; labels follow sorted folder names.

    `class_names` replaces the folder names, in sorted-folder order. `folders` fixes the classes
    (and label order): a folder outside it is an error, a class without a folder has no images.
    `name` (a reader of one's own) names the dataset in errors and in its identity.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        problem = f"folder {root!r} does not exist"
        raise missing_data_error(name, problem, "Pass root=DIR with one sub-folder per class.")
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
    files, labels = class_listing(classes, folders)
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
    """A user's class-per-folder dataset: "all" images under `root/<class>/`; with
    `root/train/` and `root/test/` (or `val/`), those (labels in `train/`'s order); else the
    seeded per-class split of `root/<class>/`."""
    root = os.fspath(root)
    split = train_or_test(split, FOLDER.splits, "folder")
    if split == "all":
        return folder_dataset(root, class_names=class_names)
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
    return subset(full, keep, f"folder/{split}/files/seed={seed},frac={train_fraction}")


FOLDER = DatasetEntry(
    "folder",
    "any class-per-folder tree ROOT/<class>/<image> (or ROOT/{train,test}/<class>/<image>)",
    folder_split,
    splits=("train", "test", "all"),
    options=("class_names", "seed", "train_fraction"),
    files_help="pass root=DIR holding one sub-folder of images per class (split by a seeded "
    "80/20 per class), or DIR/train/<class>/ and DIR/test/<class>/",
)


def seeded_class_split(labels: np.ndarray, *, train_fraction: float = 0.8, seed: int = 0):
    """Item indices split into (train, test), sorted int64: one `default_rng(seed)` permutes
    each class in increasing label order; its first `round(train_fraction * n_c)` go to train."""
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


def read_split_file(path, split: str | None = None) -> set[str]:
    """Relative image paths listed in a split file (first token of each line). A file with
    `train` and `test` section lines (RAPF's ImageNet-R list) gives `split`'s section."""
    sections: dict[str | None, set[str]] = {None: set()}
    current = None
    with open(path, encoding="utf-8") as f:
        for tokens in (line.split() for line in f):
            if tokens in (["train"], ["test"]):
                current = tokens[0]
                sections.setdefault(current, set())
            elif tokens:
                sections[current].add(tokens[0].replace("\\", "/"))
    if len(sections) > 1:
        if sections[None]:
            raise ValueError(f"split file {path!r} lists images before its first train/test line")
        if split is None:
            raise ValueError(f"split file {path!r} holds train and test sections; name the split")
        entries = sections.get(train_or_test(split), set())
    else:
        entries = sections[None]
    if not entries:
        raise ValueError(
            f"split file {path!r} lists no images" + (f" for {split!r}" if split else "")
        )
    return entries


def subset(dataset: FileDataset, keep: np.ndarray, description: str) -> FileDataset:
    """The items `keep` (int indices) of `dataset`, under a new identity `description`."""
    files = [dataset.files[i] for i in keep]
    return FileDataset(
        dataset.root, files, dataset.labels[keep], dataset.class_names, description=description
    )


_SPLIT_NAMES = {"train": "train", "test": "test", "val": "test", "validation": "test", "all": "all"}


def train_or_test(split: str, splits: Sequence[str] = ("train", "test"), name: str = "") -> str:
    """'train', or 'test' for 'test'/'val'/'validation' (or 'all' where `splits` has it)."""
    canonical = _SPLIT_NAMES.get(split)
    if canonical not in splits:
        raise ValueError(f"{name or 'the dataset'} has splits {tuple(splits)}; got {split!r}")
    return canonical
