"""Hub ids over a real HTTP connection (local servers from tests/hubserver.py): a stalled endpoint
fails within seconds with one clear paragraph, library and command line alike; a working one
downloads exactly the served checkpoint, which then loads with HF_HUB_OFFLINE=1; the `hf download`
command the message recommends fills the same cache."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import hubserver
import jax
import numpy as np
import pytest

from calfuse_jax import clip
from calfuse_jax.feature_cache import file_sha256
from calfuse_jax.models import convert
from calfuse_jax.models.hub import HUB_FILES

HUB_ID = "openai/clip-vit-base-patch16"
# What a user runs, without torch (only the parity tests use it; hidden, transformers loads faster).
LOAD = f"""
import sys
sys.modules["torch"] = None
from calfuse_jax import clip, feature_cache
try:
    clip.from_pretrained({HUB_ID!r})
    clip.load_tokenizer({HUB_ID!r})
    print(feature_cache.weights_id({HUB_ID!r}))
except clip.HubUnreachableError as err:
    print(f"HubUnreachableError: {{err}}")
"""


def start(args, env):
    process = subprocess.Popen(
        args, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    return process, time.monotonic()


def finish(started, limit=60):
    """(code, stdout, stderr, seconds) of a `start`ed process; TimeoutExpired past `limit` s."""
    process, began = started
    out, err = process.communicate(timeout=max(1, limit - (time.monotonic() - began)))
    return process.returncode, out, err, time.monotonic() - began


@pytest.fixture(scope="module")
def stalled(tmp_path_factory):
    """The library call and the command line against one silent endpoint, run side by side."""
    root = tmp_path_factory.mktemp("stalled")
    cli = [sys.executable, "-m", "experiments.run", "--config", "demo:smoke"]
    cli += [f"--config.model.name={HUB_ID}", f"--config.cache_dir={root / 'cache'}"]
    cli += ["--workdir", str(root / "run")]
    with hubserver.silent() as url:
        runs = {
            "library": start([sys.executable, "-c", LOAD], hubserver.hub_env(url, root / "hf1")),
            "cli": start(cli, hubserver.hub_env(url, root / "hf2")),
        }
        try:
            results = {name: finish(run) for name, run in runs.items()}
        finally:
            for process, _ in runs.values():
                process.kill()
    return url, root, results


def assert_clear_message(message, url):
    assert HUB_ID in message and url in message
    assert "timed out after 10 s without an answer (HF_HUB_ETAG_TIMEOUT=10;" in message
    assert f"hf download {HUB_ID} config.json model.safetensors vocab.json merges.txt" in message
    assert "snapshot_download(" in message and "HF_HUB_OFFLINE=1" in message
    assert "--config.model.name=/path/to/folder" in message
    assert "\n" not in message.strip()  # one paragraph


def test_a_silent_hub_fails_within_seconds_with_the_fixes(stalled):
    url, _, results = stalled
    code, out, err, elapsed = results["library"]
    assert code == 0, err[-3000:]
    assert elapsed < 60  # default policy: one 10 s attempt, then the message (was: none in 380 s)
    assert out.startswith("HubUnreachableError: ")
    assert_clear_message(out.removeprefix("HubUnreachableError: "), url)
    assert err.count("Retrying in") <= 1


def test_a_silent_hub_on_the_command_line_exits_2_with_one_paragraph(stalled):
    url, root, results = stalled
    code, out, err, elapsed = results["cli"]
    assert code == 2 and elapsed < 60, err[-3000:]
    assert "Traceback" not in err and err.count("Retrying in") <= 1
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, err
    assert_clear_message(message[0].removeprefix("error: "), url)
    assert not (root / "run").exists()  # nothing written for a run that never started


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny random checkpoint (all four hub files) to serve as HUB_ID."""
    return clip.random_checkpoint(tmp_path_factory.mktemp("served"), variant="tiny", seed=0)


def assert_loads_offline_as_served(cache, served):
    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported: this process is offline.
    model, params = clip.from_pretrained(HUB_ID, cache_dir=cache)
    arch, expected = convert.load_folder(served)
    assert model.arch == arch
    got, want = (
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree_util.tree_leaves_with_path(expected),
    )
    assert [path for path, _ in got] == [path for path, _ in want]
    for (path, a), (_, b) in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=str(path))
    texts = ["a photo of the cat", "an onion"]
    reference = clip.load_tokenizer(served)(texts)
    np.testing.assert_array_equal(clip.load_tokenizer(HUB_ID, cache_dir=cache)(texts), reference)


def test_a_hub_id_downloads_the_served_checkpoint_then_loads_offline(served, tmp_path):
    with hubserver.serve({HUB_ID: served}) as hub:
        run = subprocess.run(
            [sys.executable, "-c", LOAD],
            env=hubserver.hub_env(hub.url, tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == file_sha256(served / "model.safetensors")  # weights_id
    assert "PyTorch was not found" not in run.stderr and "Retrying" not in run.stderr
    downloads = sorted(path.rsplit("/", 1)[1] for method, path in hub.requests if method == "GET")
    assert downloads == sorted(HUB_FILES)  # each file once, later calls hit the cache
    assert_loads_offline_as_served(tmp_path / "hub", served)


def test_the_recommended_hf_download_fills_the_cache_for_offline_runs(served, tmp_path):
    hf = shutil.which("hf", path=str(Path(sys.executable).parent))
    assert hf, "the hf command ships with huggingface_hub"
    with hubserver.serve({HUB_ID: served}) as hub:
        run = subprocess.run(
            [hf, "download", HUB_ID, *HUB_FILES],
            env=hubserver.hub_env(hub.url, tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    assert_loads_offline_as_served(tmp_path / "hub", served)


def test_hub_retry_warnings_print_once_on_the_command_line(capfd, monkeypatch):
    # huggingface_hub's own stderr handler plus ours on the root logger printed each one twice.
    from huggingface_hub import constants
    from huggingface_hub.utils import http_backoff

    from experiments.cli import setup_console

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import (conftest: 1)
    setup_console(quiet=True)
    with hubserver.silent() as url, pytest.raises(Exception, match="timed out"):
        http_backoff("HEAD", url, timeout=0.2, max_retries=1, base_wait_time=0.1)
    err = capfd.readouterr().err
    assert err.count("Retrying in 0.1s [Retry 1/1]") == 1, err
