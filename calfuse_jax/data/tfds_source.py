"""Prepared TFDS datasets read by random access (array_record) without TensorFlow: images stay
encoded until PIL decodes them on our threads, and labels are scanned once per split into a .npy.
Preparing does need TensorFlow (the catalog builders call tf.io / tf.image); the errors say how.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import threading
from collections.abc import Sequence

import numpy as np

from calfuse_jax import paths
from calfuse_jax.data import images
from calfuse_jax.files import atomic_write


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How a prepared TFDS dataset serves one of ours."""

    tfds_name: str
    splits: dict = dataclasses.field(default_factory=lambda: {"train": "train", "test": "test"})
    wnids: tuple = ()  # keep/map TFDS labels by wnid (ImageNet-1k label space), in label order
    seeded_split: bool = False  # no train/test in TFDS: seeded per-class split of one TFDS split
    manual: str = ""  # manual-download note for the prepare command


def default_data_dir() -> str:
    """TFDS's data dir: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def prepare_instructions(tfds_name: str, data_dir: str, manual: str = "") -> str:
    manual = f"with {manual}\n" if manual else ""
    return f"""\
TFDS's `{tfds_name}` builder needs TensorFlow to *prepare* the data (once; reading needs
none). In any environment with TensorFlow (a separate venv is fine), run
    pip install tensorflow tensorflow-datasets importlib_resources
    tfds build {tfds_name} --data_dir={data_dir} --file_format=array_record
{manual}then call again with data_dir={data_dir}. A dataset prepared as tfrecord converts with
    tfds convert_format --dataset_version_dir={data_dir}/{tfds_name}/VERSION \
--out_file_format=array_record
Or use the plain files instead: source="files", root=... (see calfuse_jax.data.registry)."""


def find_prepared(tfds_name: str, data_dir: str) -> str | None:
    """Newest `DATA_DIR/<name>[/<config>]/<version>` holding a `dataset_info.json`, or None."""
    found = []
    for dirpath, _, filenames in os.walk(os.path.join(data_dir, tfds_name)):
        if "dataset_info.json" in filenames and "incomplete" not in dirpath:
            version = os.path.basename(dirpath)
            try:
                found.append((tuple(int(p) for p in version.split(".")), dirpath))
            except ValueError:
                continue
    return max(found)[1] if found else None


def open_builder(tfds_name: str, data_dir: str | None = None, download: bool = False, manual=""):
    """A read-only TFDS builder over the prepared array_record folder (prepares it if asked)."""
    import tensorflow_datasets as tfds

    data_dir = os.fspath(data_dir or default_data_dir())

    def missing(problem: str) -> FileNotFoundError:
        return images.missing_data_error(
            tfds_name, problem, prepare_instructions(tfds_name, data_dir, manual)
        )

    folder = find_prepared(tfds_name, data_dir)
    if folder is None and download:
        if importlib.util.find_spec("tensorflow") is None:  # fail before a long download
            raise missing(
                "download=True asks TFDS to prepare the data, and its builder needs TensorFlow"
            )
        try:
            builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
            builder.download_and_prepare()
        except ModuleNotFoundError as error:  # tensorflow, importlib_resources, ...
            problem = f"preparing needs the module {error.name!r}, which is not installed"
            raise missing(problem) from error
        folder = find_prepared(tfds_name, data_dir)
    if folder is None:
        raise missing(f"no prepared TFDS dataset under {os.path.join(data_dir, tfds_name)!r}")
    builder = tfds.builder_from_directory(folder)
    file_format = str(builder.info.file_format).lower()
    if "array_record" not in file_format:
        raise missing(f"{folder!r} is prepared as {file_format}; random access needs array_record")
    return builder


def cached_labels(builder, tfds_split: str, source, label_cache, batch: int = 1024) -> np.ndarray:
    """int64 [N]: the label of every record of `source`, kept as a .npy in `label_cache`."""
    info = builder.info
    key = images.content_hash(
        info.name, str(info.version), tfds_split, len(source), info.config_name
    )
    path = os.path.join(label_cache, f"{info.name}-{tfds_split}-{key}.npy")
    if os.path.exists(path):
        labels = np.load(path, allow_pickle=False)
        if labels.shape == (len(source),):
            return labels
    labels = np.empty(len(source), dtype=np.int64)
    for start in range(0, len(source), batch):  # images stay encoded: I/O bound
        records = source.__getitems__(list(range(start, min(start + batch, len(source)))))
        labels[start : start + len(records)] = [int(r["label"]) for r in records]
    atomic_write(path, "wb", lambda f: np.save(f, labels, allow_pickle=False))
    return labels


class TfdsDataset(images.ImageDataset):
    """Items `indices` of one TFDS data source; images decoded from their encoded bytes."""

    def __init__(self, source, indices, labels, class_names, *, description: str):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names)
        digest = images.content_hash(self.indices, self.labels)
        self.identity = f"{description}/n={len(self.labels)}/items={digest}"
        self._lock = threading.Lock()

    def load(self, index: int) -> np.ndarray:
        return self.load_batch([index])[0]

    def load_batch(self, indices: Sequence[int]) -> list[np.ndarray]:
        with self._lock:  # record reads serialised; decoding runs in parallel
            records = self.source.__getitems__([int(self.indices[p]) for p in indices])
        return [_decode_record(r) for r in records]


def _decode_record(record) -> np.ndarray:
    image = record["image"]
    if isinstance(image, (bytes, bytearray)):
        return images.decode_image(io.BytesIO(image))
    return images.to_rgb(image)  # already decoded (e.g. a mock source)


def tfds_dataset(
    entry: images.DatasetEntry,
    split: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    seed: int = 0,
    train_fraction: float = 0.8,
    cache_dir: str | os.PathLike | None = None,
) -> TfdsDataset:
    """Dataset `entry` (one with a `tfds` spec) from its prepared TFDS dataset."""
    import tensorflow_datasets as tfds

    spec, split = entry.tfds, images.train_or_test(split, name=entry.name)
    builder = open_builder(spec.tfds_name, data_dir, download, spec.manual)
    tfds_split = spec.splits[split]
    if tfds_split not in builder.info.splits:
        raise ValueError(
            f"{spec.tfds_name} has no split {tfds_split!r}: {list(builder.info.splits)}"
        )
    skip_decoding = {"image": tfds.decode.SkipDecoding()}
    source = builder.as_data_source(split=tfds_split, decoders=skip_decoding)
    labels = cached_labels(builder, tfds_split, source, paths.cache_root(cache_dir) / "tfds_labels")
    indices = np.arange(len(labels))
    if spec.wnids:  # ImageNet-1k label space -> the benchmark's classes, by wnid
        tfds_names = builder.info.features["label"].names
        position = {w: i for i, w in enumerate(spec.wnids)}
        mapping = np.asarray([position.get(w, -1) for w in tfds_names], dtype=np.int64)
        labels = mapping[labels]
        indices, labels = indices[labels >= 0], labels[labels >= 0]
    description = f"{entry.name}/{split}/tfds/{spec.tfds_name}:{builder.info.version}"
    if spec.seeded_split:
        train, test = images.seeded_class_split(labels, train_fraction=train_fraction, seed=seed)
        keep = train if split == "train" else test
        indices, labels = indices[keep], labels[keep]
        description += f"/seed={seed},frac={train_fraction}"
    names = entry.names
    if len(names) and labels.size and labels.max() >= len(names):
        raise ValueError(f"{spec.tfds_name}: label {labels.max()} beyond {len(names)} class names")
    return TfdsDataset(source, indices, labels, names, description=description)
