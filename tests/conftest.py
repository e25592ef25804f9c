"""Test-wide setup.

Four fake CPU devices for the whole suite, set before jax is first imported, so that sharding tests
can compare a 1-device mesh with a 4-device mesh in one process. Single-device code simply runs on
device 0. Nothing here touches the network.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Datasets fetched in tests come from a fixture's server on 127.0.0.1 (tests/data/test_download.py);
# any other fetch meets a closed local port and fails at once instead of reaching the internet.
os.environ.setdefault("CALFUSE_MIRROR", "http://127.0.0.1:9")
# One persistent XLA compilation cache for this session and every process it starts (they inherit
# the environment): runs of the same tiny configs in-process, in CLI subprocesses, notebook kernels
# and distributed workers then compile each program once. Every compile is stored (the head's
# programs compile well under JAX's 1 s default threshold). Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="calfuse-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import jax.numpy as jnp  # noqa: E402  (after XLA_FLAGS: jax must see the fake devices)
import pytest  # noqa: E402

from calfuse_jax import features  # noqa: E402


@pytest.fixture
def counted(monkeypatch):
    """Counts encoder calls (batches); raises KeyboardInterrupt after `limit` calls; `poison`
    (a row index) makes the encoder return NaN features for that row of every batch."""
    state = {"calls": 0, "limit": None, "poison": None}
    real = features.make_image_encoder

    def make(*args, **kwargs):
        encoder = real(*args, **kwargs)

        def run(pixels):
            if state["limit"] is not None and state["calls"] >= state["limit"]:
                raise KeyboardInterrupt("simulated interruption")
            state["calls"] += 1
            out = encoder(pixels)
            return out if state["poison"] is None else out.at[state["poison"]].set(jnp.nan)

        return run

    monkeypatch.setattr(features, "make_image_encoder", make)
    return state
