"""TFDS reader on tiny array_record datasets prepared here, without TensorFlow.

The fixtures prepare real TFDS datasets with `GeneratorBasedBuilder` (images given as PNG bytes:
encoding a NumPy image would need TensorFlow, decoding PNG bytes does not), then put them where
the catalog datasets live (`DATA_DIR/<tfds name>/<version>/`), so the reader's real path runs:
`builder_from_directory` -> `as_data_source` -> our PIL decoding.
"""

import importlib.util
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from calfuse_jax.data import DATASETS, load_dataset, tfds_source
from calfuse_jax.data import class_names as names_lib


def _png(array) -> io.BytesIO:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def _image(index: int) -> np.ndarray:
    """Image k is recognisable from its pixels: constant value k, odd size."""
    return np.full((5, 6, 3), index, np.uint8)


class CalfuseFakeCifar(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("3.0.2")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=list(names_lib.CIFAR100)),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 12), "test": self._generate_examples(100, 4)}

    def _generate_examples(self, offset, count):
        for k in range(count):
            yield k, {"image": _png(_image(offset + k)), "label": (7 * k) % 100}


IMAGENET_LABELS = os.path.join(
    os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt"
)


class CalfuseFakeImagenetR(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Like TFDS's imagenet_r: one `test` split labelled in ImageNet-1k space (1000 wnids)."""

    VERSION = tfds.core.Version("0.2.0")
    WNIDS = [w for w, _ in names_lib.IMAGENET_R[:3]]

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names_file=IMAGENET_LABELS),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        all_wnids = open(IMAGENET_LABELS).read().split()
        # 5 images of each of 3 ImageNet-R classes, plus 2 of class n01440764 (not in ImageNet-R).
        items = [w for w in self.WNIDS for _ in range(5)] + ["n01440764"] * 2
        for k, wnid in enumerate(items):
            yield k, {"image": _png(_image(k)), "label": all_wnids.index(wnid)}


def _prepare(builder_cls, data_dir, tfds_name):
    scratch = data_dir / "scratch"
    builder = builder_cls(data_dir=str(scratch), file_format="array_record")
    builder.download_and_prepare()
    target = data_dir / tfds_name / str(builder_cls.VERSION)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.data_dir, target)
    shutil.rmtree(scratch)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    _prepare(CalfuseFakeCifar, root, "cifar100")
    _prepare(CalfuseFakeImagenetR, root, "imagenet_r")
    return root


def test_cifar_from_prepared_array_record(data_dir, tmp_path):
    # load_dataset's auto source finds the prepared copy; cache_dir holds the label scans.
    ds = load_dataset("cifar100", "train", data_dir=data_dir, cache_dir=tmp_path)
    assert len(ds) == 12 and ds.class_names == names_lib.CIFAR100
    assert sorted(ds.labels.tolist()) == sorted((7 * k) % 100 for k in range(12))
    # The item's pixels identify it: the label stored with it must be the one we report.
    for i, image in enumerate(ds.load_batch(range(12))):
        assert image.shape == (5, 6, 3)
        assert ds.labels[i] == (7 * int(image[0, 0, 0])) % 100
    test = load_dataset("cifar100", "test", source="tfds", data_dir=data_dir, cache_dir=tmp_path)
    assert sorted(int(img[0, 0, 0]) for img in test.load_batch(range(4))) == [100, 101, 102, 103]
    # Labels were scanned once and cached; a reopen reads the cache.
    assert len(list((tmp_path / "tfds_labels").glob("*.npy"))) == 2
    again = load_dataset("cifar100", "train", source="tfds", data_dir=data_dir, cache_dir=tmp_path)
    assert again.identity == ds.identity


def test_imagenet_r_maps_wnids_and_splits(data_dir, tmp_path):
    kwargs = dict(source="tfds", data_dir=data_dir, cache_dir=tmp_path, split_protocol="seeded")
    train = load_dataset("imagenet_r", "train", **kwargs)
    test = load_dataset("imagenet_r", "test", **kwargs)
    assert len(train.class_names) == 200 and train.class_names[0] == "goldfish"
    assert np.bincount(train.labels, minlength=3).tolist() == [4, 4, 4]
    assert np.bincount(test.labels, minlength=3).tolist() == [1, 1, 1]
    seen = sorted(int(img[0, 0, 0]) for d in (train, test) for img in d.load_batch(range(len(d))))
    assert seen == list(range(15))  # the two tench images (k = 15, 16) are dropped
    for d in (train, test):
        for i, img in enumerate(d.load_batch(range(len(d)))):
            assert d.labels[i] == int(img[0, 0, 0]) // 5


def test_missing_dataset_names_the_prepare_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)TensorFlow.*tfds build caltech_birds2011"):
        tfds_source.tfds_dataset(DATASETS["cub200"], "train", data_dir=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TF installed")
def test_download_without_tensorflow_fails_before_downloading(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)needs TensorFlow.*tfds build cifar100"):
        tfds_source.tfds_dataset(DATASETS["cifar100"], "train", data_dir=tmp_path, download=True)
    assert not any(tmp_path.iterdir())  # nothing fetched


def test_reading_never_imports_tensorflow(data_dir, tmp_path):
    code = (
        "import sys; from calfuse_jax.data import load_dataset; "
        f"ds = load_dataset('cifar100', 'train', source='tfds', data_dir={str(data_dir)!r}, "
        f"cache_dir={str(tmp_path)!r}); ds.load(0); "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
