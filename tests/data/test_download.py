"""`calfuse_jax.data.download` against a local server (tests/downloads.py): resumed and restarted
downloads, checksums, copies put there by hand, concurrent fetches, and ImageNet-R's RAPF split
list fetched and used by `load_dataset`."""

import threading

import numpy as np
import pytest
from downloads import FileServer, imagenet_r_archive, publish, rapf_split, sha256

from calfuse_jax.data import DATASETS, download, load_dataset
from calfuse_jax.data import class_names as names_lib

NAME = "cifar-100-python.tar.gz"
DATA = bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8))


@pytest.fixture
def server(monkeypatch):
    publish(monkeypatch, "cifar100", DATA)
    with FileServer({NAME: DATA}) as server:
        monkeypatch.setenv("CALFUSE_MIRROR", server.url)
        yield server


def fetch(folder):
    return download.fetch(DATASETS["cifar100"].archive, folder, progress=False)


def test_a_broken_connection_resumes_with_range(server, tmp_path):
    # The first answer stops after two network reads' worth (a read cut short is lost).
    cut = 2 * download.STREAM_CHUNK
    server.cut_after[NAME] = cut
    path = fetch(tmp_path)
    assert server.requests == [(NAME, None), (NAME, f"bytes={cut}-")]
    assert sha256(path.read_bytes()) == sha256(DATA)
    assert server.sent[NAME] == len(DATA)  # nothing fetched twice


def test_a_part_left_by_an_earlier_run_is_resumed(server, tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(DATA[:123_456])  # a killed process's download
    assert fetch(tmp_path).read_bytes() == DATA
    assert server.requests == [(NAME, "bytes=123456-")]
    assert server.sent[NAME] == len(DATA) - 123_456


def test_a_server_answering_200_to_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    (tmp_path / f"{NAME}.part").write_bytes(b"x" * 5000)  # appended to, it would fail the check
    assert fetch(tmp_path).read_bytes() == DATA
    assert server.requests == [(NAME, "bytes=5000-")] and server.sent[NAME] == len(DATA)


def test_a_wrong_checksum_is_reported_and_the_download_deleted(server, tmp_path, monkeypatch):
    publish(monkeypatch, "cifar100", b"another file")
    with pytest.raises(download.DownloadError) as info:
        fetch(tmp_path)
    message = str(info.value)
    assert f"{server.url}/{NAME}" in message and sha256(b"another file") in message
    assert sha256(DATA) in message  # what was found
    assert str(tmp_path / NAME) in message  # where a copy fetched by hand goes
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{NAME}.lock"]


def test_a_copy_put_there_by_hand_is_verified_and_used(server, tmp_path):
    (tmp_path / NAME).write_bytes(DATA)
    assert fetch(tmp_path).read_bytes() == DATA and server.requests == []
    (tmp_path / NAME).write_bytes(DATA[:-1])  # a truncated copy: reported, never deleted
    with pytest.raises(download.DownloadError, match="delete it"):
        fetch(tmp_path)
    assert (tmp_path / NAME).read_bytes() == DATA[:-1] and server.requests == []


def test_concurrent_fetches_download_once(server, tmp_path):
    server.delay = 0.5  # the first download is still running when the second fetch starts
    paths, errors = [], []

    def worker():
        try:
            paths.append(fetch(tmp_path))
        except Exception as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and len(paths) == 2
    assert server.requests == [(NAME, None)]  # the second waited for the lock, then found it
    assert (tmp_path / NAME).read_bytes() == DATA


@pytest.mark.parametrize(
    "name, link, symbolic, problem",
    [
        ("cifar-100-python/../../evil", None, False, "climbs out"),
        ("/tmp/evil", None, False, "absolute path"),
        ("cifar-100-python/link", "../../outside", True, "outside the folder"),
        ("cifar-100-python/hard", "../outside", False, "outside the folder"),
        ("cifar-100-python/fine", "cifar-100-python/train", True, None),
    ],
)
def test_unsafe_members_are_named(name, link, symbolic, problem):
    import tarfile

    member = tarfile.TarInfo(name)
    if link:
        member.type = tarfile.SYMTYPE if symbolic else tarfile.LNKTYPE
        member.linkname = link
    found = download._unsafe(member)
    assert (found is None) if problem is None else (problem in found)


def test_imagenet_r_reads_rapfs_fetched_split(tmp_path, monkeypatch):
    archive, split_list = imagenet_r_archive(per_class=3), rapf_split(per_class=3)
    publish(monkeypatch, "imagenet_r", archive)
    publish(monkeypatch, "imagenet_r_split", split_list)
    files = {"imagenet-r.tar": archive, "imgr_train_test_split.txt": split_list}
    with FileServer(files) as server:
        monkeypatch.setenv("CALFUSE_MIRROR", server.url)
        train = load_dataset("imagenet_r", "train", download_dir=tmp_path, progress=False)
        test = load_dataset("imagenet_r", "test", download_dir=tmp_path, progress=False)
        seeded = load_dataset("imagenet_r", "train", download_dir=tmp_path, split_protocol="seeded")
    wnids = names_lib.wnids(names_lib.IMAGENET_R)
    # The list's choice (first two images train, third test), which the seeded split does not make.
    assert train.files == tuple(f"{w}/art_{j}.jpg" for w in wnids for j in (0, 1))
    assert test.files == tuple(f"{w}/art_2.jpg" for w in wnids)
    assert np.bincount(train.labels).tolist() == [2] * 200 and test.labels.tolist() == list(
        range(200)
    )
    assert seeded.files != train.files and seeded.identity != train.identity
    assert train.load(0).shape == (8, 8, 3)
    assert sorted(name for name, _ in server.requests) == sorted(files)  # each fetched once
    assert (tmp_path / "imgr_train_test_split.txt").read_bytes() == split_list


def test_a_data_folder_that_cannot_be_made_is_reported(tmp_path):
    (tmp_path / "data").write_text("a file where the folder should be")
    with pytest.raises(
        download.DownloadError, match="cannot create the data folder .*CALFUSE_DATA"
    ):
        fetch(tmp_path / "data")
