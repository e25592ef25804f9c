"""Damaged or hostile inputs and a disk that refuses a write, met by `python -m experiments.run`:
exit 2 with one paragraph naming the file and the fix, never a traceback (review cases EN-3,
EN-5, SE-1, FI-18, FI-19, EN-7, EN-10)."""

import errno
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from calfuse_jax import clip, files
from calfuse_jax.models.convert import config_from_arch
from experiments import run


def run_demo(tmp_path, *overrides):
    return run.main(["--config", "demo:smoke", "--workdir", str(tmp_path / "run"), "-q",
                     f"--config.cache_dir={tmp_path / 'cache'}", *overrides])  # fmt: skip


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_damaged_checkpoint_file_is_named_with_the_fix(tmp_path, capsys, name):
    # A CLIP folder of the demo's architecture whose `name` stops a third of the way in (an
    # interrupted download); the other file is sound, so the damaged one is what stops the run.
    folder = tmp_path / "clip"
    config_from_arch(clip.VARIANTS["tiny"]).save_pretrained(folder)
    save_file({"logit_scale": np.zeros((), np.float32)}, folder / "model.safetensors")
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 3])
    assert run_demo(tmp_path, f"--config.model.name={folder}") == 2
    err = capsys.readouterr().err
    assert f"{folder / name} is damaged" in err and "delete it and download" in err
    assert "Traceback" not in err


def test_a_malicious_cifar_pickle_is_refused_naming_the_file(tmp_path, capsys):
    # SE-1: the restricted unpickler refused it already, but with a traceback and exit 1.
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for member in ("train", "test", "meta"):
        (root / member).write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    cache = tmp_path / "cache"
    argv = ["--config", "cifar100:smoke", "--workdir", str(tmp_path / "run"), "-q",
            f"--config.dataset.root={root}", f"--config.cache_dir={cache}"]  # fmt: skip
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "cifar-100-python/train" in err and "refusing to load" in err
    assert "delete it and fetch the archive again" in err and "Traceback" not in err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_exit_2_naming_the_file(tmp_path, capsys, monkeypatch, code):
    # Simulated in-process (a real full or read-only file system needs root to mount): every
    # atomic write of the run folder fails as the OS would fail it.
    def refuse(path, mode, write):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(files, "atomic_write", refuse)
    monkeypatch.setattr("calfuse_jax.rundir.atomic_write", refuse)
    argv = ["--config", "synthetic:smoke", "--workdir", str(tmp_path / "run"), "-q"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'run'}" in err and os.strerror(code) in err
    assert "run the same command again" in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_workdir_parent_is_exit_2(tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    try:
        assert run.main(["--config", "synthetic:smoke", "--workdir", str(parent / "run")]) == 2
    finally:
        parent.chmod(0o755)
    err = capsys.readouterr().err
    assert f"cannot write {parent / 'run'}" in err and "Traceback" not in err


def test_a_full_disk_while_writing_random_weights_leaves_no_debris(tmp_path, capsys, monkeypatch):
    """FI-19: safetensors reports a full disk in its own error type, without errno."""
    from safetensors import SafetensorError

    def full(folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"\0" * 100)  # a part was written
        raise SafetensorError('IoError(Os { code: 28, message: "No space left on device" })')

    monkeypatch.setattr(clip, "random_checkpoint", full)
    assert run_demo(tmp_path) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not list((tmp_path / "cache" / "models").glob(".tmp-*"))  # the partial folder is gone


def test_a_real_full_disk_is_one_paragraph(tmp_path):
    """FI-18 on a real 300 KB file system (needs root to mount it): exit 2 and our paragraph;
    the Orbax savers' own errors are one line each, with no traceback."""
    disk = tmp_path / "full"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("mounting a small file system needs root")
    try:
        command = [sys.executable, "-m", "experiments.run", "--config", "synthetic:smoke", "-q",
                   "--workdir", str(disk / "run"), "--config.train.epochs=1"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
    assert done.returncode == 2, done.stderr
    assert "No space left on device. Free disk space" in done.stderr
    # Known, not ours: TensorStore reads still in flight when Orbax closes its event loop may
    # print `RuntimeError: Event loop is closed` (timing-dependent; see the WD-13 note).
    blocks = done.stderr.split("Traceback (most recent call last):")[1:]
    assert all("RuntimeError: Event loop is closed" in block for block in blocks), done.stderr
