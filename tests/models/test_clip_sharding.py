"""The jitted image encoder with the batch sharded over 4 (fake CPU) devices equals 1 device."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from calfuse_jax import clip


def test_sharded_encode_image_equals_single_device():
    if jax.device_count() < 4:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4 (tests/conftest.py)")
    arch = clip.VARIANTS["tiny"]
    model, params = clip.CLIP(arch), clip.init_params(arch, seed=0)
    pixels = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
    encode = jax.jit(functools.partial(model.apply, method=model.encode_image))

    single = jax.devices()[0]
    one = encode(jax.device_put({"params": params}, single), jax.device_put(pixels, single))

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    batch = jax.device_put(pixels, NamedSharding(mesh, P("data")))
    replicated = jax.device_put({"params": params}, NamedSharding(mesh, P()))
    many = encode(replicated, batch)

    assert len(many.sharding.device_set) == 4
    assert many.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), ndim=2)
    # Each device runs the same per-example maths on 2 of the 8 rows; only matmul blocking may
    # change the float summation order.
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), atol=1e-5, rtol=1e-5)


def test_each_tower_runs_on_its_own_params():
    # The continual pipeline encodes images and texts at different times; either half suffices.
    arch = clip.VARIANTS["tiny"]
    model, params = clip.CLIP(arch), clip.init_params(arch, seed=0)
    pixels = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    tokens = np.full((2, 77), 521, np.int32)
    vision = {k: params[k] for k in ("vision_model", "visual_projection")}
    text = {k: params[k] for k in ("text_model", "text_projection")}
    encode_image = jax.jit(functools.partial(model.apply, method=model.encode_image))
    encode_text = jax.jit(functools.partial(model.apply, method=model.encode_text))
    np.testing.assert_array_equal(
        np.asarray(encode_image({"params": vision}, pixels)),
        np.asarray(encode_image({"params": params}, pixels)),
    )
    np.testing.assert_array_equal(
        np.asarray(encode_text({"params": text}, tokens)),
        np.asarray(encode_text({"params": params}, tokens)),
    )
