"""`python -m experiments.run --config cifar100 | imagenet_r | cub200` with no data flag: the
archives come from a local mirror ($CALFUSE_MIRROR, tests/downloads.py) in their real formats, are
verified, unpacked into $CALFUSE_CACHE/data and used; a second run fetches nothing. Failures
(wrong checksum, unsafe archive, offline, ImageNet-2012) exit 2 with one paragraph and leave
nothing that a later run would trust."""

import os
import socket

import huggingface_hub.constants
import pytest
from downloads import (
    FileServer,
    cifar_archive,
    cub_archive,
    imagenet_r_archive,
    publish,
    rapf_split,
    sha256,
    tar_bytes,
)

from calfuse_jax import clip, rundir
from calfuse_jax.data import DATASETS, download
from experiments import run

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Resource name -> (file, fixture bytes); three images per class (two train, one test).
FIXTURES = {
    "cifar100": ("cifar-100-python.tar.gz", cifar_archive(train_per_class=2, test_per_class=1)),
    "imagenet_r": ("imagenet-r.tar", imagenet_r_archive(per_class=3)),
    "imagenet_r_split": ("imgr_train_test_split.txt", rapf_split(per_class=3)),
    "cub200": ("CUB_200_2011.tgz", cub_archive(per_class=3)),
}
IMAGES = {"cifar100": (200, 100), "imagenet_r": (400, 200), "cub200": (400, 200)}  # train, test


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The configs' weights, openai/clip-vit-base-patch16, as a tiny random checkpoint in the
    Hugging Face cache layout (the tests run offline: HF_HUB_OFFLINE=1)."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / "models--openai--clip-vit-base-patch16"
    clip.random_checkpoint(repo / "snapshots" / COMMIT, variant="tiny", seed=0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


@pytest.fixture
def env(hub, tmp_path, monkeypatch):
    """A fresh cache root, the tiny hub cache, and the checksum table expecting the fixtures."""
    monkeypatch.setenv("CALFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CALFUSE_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read at import
    for name, (_, data) in FIXTURES.items():
        publish(monkeypatch, name, data)
    return tmp_path / "cache" / "data"


@pytest.fixture
def mirror(env, monkeypatch):
    with FileServer(dict(FIXTURES.values())) as server:
        monkeypatch.setenv("CALFUSE_MIRROR", server.url)
        yield server


def cli(config, workdir, capsys):
    """run.main as the command line runs it; returns (exit code, the error paragraph or '')."""
    code = run.main(
        ["--config", config, "--workdir", str(workdir), "--config.progress=false"]
        # The data path is under test, not the method: zero-shot skips training's compilations
        # (the dominant cost on CPU), the plots skip matplotlib. Everything else is the config's.
        + ["--config.method=zeroshot", "--config.outputs.plots=false"]
        + ["--config.outputs.tensorboard=false"]
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if "error: " not in err:
        return code, ""
    return code, err.split("error: ", 1)[1].split("\n(run with --traceback", 1)[0]


def trusted_leftovers(data_dir):
    """What a later run would use: unpacked folders, finished files, unfinished temporaries."""
    if not data_dir.exists():
        return []
    return sorted(p.name for p in data_dir.iterdir() if not p.name.endswith(".lock"))


@pytest.mark.parametrize("config", ["cifar100", "imagenet_r", "cub200"])
def test_each_benchmark_fetches_its_data_and_runs(
    config, mirror, env, tmp_path, monkeypatch, capsys
):
    file, data = FIXTURES[config]
    if config == "cifar100":  # the first answer breaks off: the run resumes it with Range
        mirror.cut_after[file] = 4 * download.STREAM_CHUNK
    code, error = cli(config, tmp_path / "run", capsys)
    assert code == 0, error
    summary = rundir.read_json(tmp_path / "run" / "summary.json")
    assert len(summary["accuracy_matrix"]) == 10 and 0 <= summary["last"] <= 100
    images = rundir.read_json(tmp_path / "run" / "provenance.json")["dataset"]
    assert (images["train"]["images"], images["test"]["images"]) == IMAGES[config]
    unpacked = DATASETS[config].archive.unpacks_to
    assert sha256((env / file).read_bytes()) == sha256(data)  # the archive stays, verified
    expected = sorted(
        [file, unpacked] + (["imgr_train_test_split.txt"] if config == "imagenet_r" else [])
    )
    assert trusted_leftovers(env) == expected  # no .part, no .tmp-* folder
    if config == "cifar100":
        assert mirror.requests == [(file, None), (file, f"bytes={4 * download.STREAM_CHUNK}-")]
        assert mirror.sent[file] == len(data)
    if config == "imagenet_r":  # RAPF's list decides the split: 2 train + 1 test per class
        assert "split_file" in images["train"]["identity"]
        requests, opened = len(mirror.requests), []
        spy = download.ensure_extracted
        monkeypatch.setattr(
            download, "ensure_extracted", lambda *a, **k: opened.append(a) or spy(*a, **k)
        )
        assert cli(config, tmp_path / "run", capsys)[0] == 0  # the same command again
        assert len(opened) == 2 and len(mirror.requests) == requests  # looked, fetched nothing


def test_a_wrong_checksum_exits_2_and_keeps_nothing(mirror, env, tmp_path, monkeypatch, capsys):
    publish(monkeypatch, "cub200", b"what the page published")
    code, error = cli("cub200", tmp_path / "run", capsys)
    assert code == 2 and "\n\n" not in error
    assert f"{mirror.url}/CUB_200_2011.tgz" in error and sha256(b"what the page published") in error
    assert f"save it as {env / 'CUB_200_2011.tgz'}" in error
    assert trusted_leftovers(env) == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "member, link, problem",
    [
        ("cifar-100-python/../../evil", None, "climbs out with '..'"),
        ("/tmp/calfuse-evil", None, "absolute path"),
        ("cifar-100-python/evil", "../../../outside", "outside the folder"),
    ],
)
def test_an_unsafe_archive_exits_2_and_unpacks_nothing(
    member, link, problem, env, tmp_path, monkeypatch, capsys
):
    good = {f"cifar-100-python/{m}": b"x" for m in ("train", "test", "meta")}
    bad = tar_bytes(
        good | ({} if link else {member: b"evil"}), links=[(member, link, True)] if link else ()
    )
    publish(monkeypatch, "cifar100", bad)
    with FileServer({"cifar-100-python.tar.gz": bad}) as server:
        monkeypatch.setenv("CALFUSE_MIRROR", server.url)
        code, error = cli("cifar100", tmp_path / "run", capsys)
    assert code == 2 and problem in error and "refusing to unpack" in error and "\n\n" not in error
    # The verified archive stays (it is what the page published); nothing was unpacked from it.
    assert trusted_leftovers(env) == ["cifar-100-python.tar.gz"]
    assert not any(tmp_path.rglob("*evil*")) and not any(tmp_path.rglob("outside"))
    assert not os.path.lexists("/tmp/calfuse-evil")
    assert not (tmp_path / "run").exists()


def test_offline_exits_2_naming_url_file_checksum_and_place(env, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("CALFUSE_MIRROR", url)
    code, error = cli("cifar100", tmp_path / "run", capsys)
    assert code == 2 and "\n\n" not in error
    resource = DATASETS["cifar100"].archive
    for part in (f"{url}/cifar-100-python.tar.gz", resource.url, resource.checksum):
        assert part in error
    assert f"save it as {env / 'cifar-100-python.tar.gz'}" in error and "CALFUSE_MIRROR" in error
    assert trusted_leftovers(env) == []


def test_imagenet100_without_data_says_what_to_download(env, tmp_path, capsys):
    code, error = cli("imagenet100", tmp_path / "run", capsys)
    assert code == 2
    assert "ILSVRC2012_img_train.tar" in error and "image-net.org" in error
    assert f"{env / 'imagenet'}/train/<wnid>/*.JPEG" in error
    assert trusted_leftovers(env) == []
