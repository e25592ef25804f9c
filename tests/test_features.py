"""Feature cache: numbers equal a direct encoder call, hits skip the encoder, interrupted runs
resume from finished chunks, corruption is caught, 4 devices give what 1 device gives."""

import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calfuse_jax import clip, feature_cache, features
from calfuse_jax.data.shapes import ShapesDataset
from calfuse_jax.preprocess import preprocess

TRACES = []


class StandIn(nn.Module):
    """Linear image encoder on flattened pixels; records each trace (Python runs only when
    jit traces), so the tests can check the encoder is traced once."""

    dim: int = 6

    def setup(self):
        self.proj = nn.Dense(self.dim)

    def encode_image(self, pixels):  # [B, S, S, 3] -> [B, D]
        TRACES.append(pixels.shape)
        return self.proj(pixels.reshape(pixels.shape[0], -1))


SIZE = 8


@pytest.fixture(scope="module")
def stand_in():
    model = StandIn()
    params = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), method=model.encode_image)
    return model, params["params"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = clip.random_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=0)
    model, params = clip.from_pretrained(folder)
    return folder, model, params


def _direct(model, params, ds, size):
    pixels = preprocess(ds.load_batch(range(len(ds))), size)
    return np.asarray(model.apply({"params": params}, pixels, method=model.encode_image))


def test_tiny_clip_features_equal_direct_encoder(tiny_clip, tmp_path):
    folder, model, params = tiny_clip
    ds = ShapesDataset("train", num_per_class=1, image_size=20)
    wid = feature_cache.weights_id(folder)
    feats, labels = features.image_features(
        ds, model, params, cache_dir=tmp_path, weights_id=wid, batch_size=4, progress=False
    )
    assert feats.dtype == np.float32 and feats.shape == (10, model.embed_dim)
    np.testing.assert_array_equal(labels, ds.labels)
    np.testing.assert_allclose(feats, _direct(model, params, ds, model.image_size), atol=2e-5)
    # One device gives the same numbers as four (separate caches: the mesh is not in the key).
    one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    single, _ = features.image_features(
        ds,
        model,
        params,
        cache_dir=tmp_path / "one",
        weights_id=wid,
        batch_size=4,
        mesh=one,
        progress=False,
    )
    assert len(jax.devices()) == 4
    np.testing.assert_allclose(single, feats, atol=2e-5)


def test_cache_hit_trace_once_and_ragged_batch(stand_in, counted, tmp_path):
    model, params = stand_in
    ds = ShapesDataset(
        "train", num_per_class=1, image_size=12
    )  # 10 images -> batches 4, 4, 2 (+2 pad)
    TRACES.clear()
    features._jitted_encoder.cache_clear()  # count this test's traces from a cold start
    kwargs = dict(cache_dir=tmp_path, weights_id="w", image_size=SIZE, batch_size=4, progress=False)
    feats, _ = features.image_features(ds, model, params, **kwargs)
    assert counted["calls"] == 3 and TRACES == [(4, SIZE, SIZE, 3)]
    np.testing.assert_allclose(feats, _direct(model, params, ds, SIZE), atol=1e-5)
    again, labels = features.image_features(ds, model, params, **kwargs)
    assert counted["calls"] == 3  # cache hit: no encoder call
    np.testing.assert_array_equal(again, feats)
    np.testing.assert_array_equal(labels, ds.labels)
    # Anything that changes the numbers changes the key.
    features.image_features(ds, model, params, **{**kwargs, "weights_id": "other"})
    assert counted["calls"] == 6


def test_interrupted_run_resumes_from_finished_chunks(stand_in, counted, tmp_path):
    model, params = stand_in
    ds = ShapesDataset("train", num_per_class=1, image_size=12)
    kwargs = dict(
        cache_dir=tmp_path,
        weights_id="w",
        image_size=SIZE,
        batch_size=4,
        chunk_size=4,
        progress=False,
    )
    counted["limit"] = 2
    with pytest.raises(KeyboardInterrupt):
        features.image_features(ds, model, params, **kwargs)
    chunks = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.glob("images/*/chunks/*.npy"))
    assert chunks == ["chunk-000000000-000000004", "chunk-000000004-000000008"]  # + sha256
    counted["limit"] = None
    feats, _ = features.image_features(ds, model, params, **kwargs)
    assert counted["calls"] == 3  # 2 before the interruption + only the last chunk now
    np.testing.assert_allclose(feats, _direct(model, params, ds, SIZE), atol=1e-5)
    assert not list(tmp_path.glob("images/*/chunks/*.npy"))  # merged, chunks removed


def test_corrupted_cache_is_detected_and_recomputed(stand_in, counted, tmp_path):
    model, params = stand_in
    ds = ShapesDataset("test", num_per_class=1, image_size=12)
    kwargs = dict(cache_dir=tmp_path, weights_id="w", image_size=SIZE, batch_size=8, progress=False)
    feats, _ = features.image_features(ds, model, params, **kwargs)
    (path,) = tmp_path.glob("images/*/features.npy")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the last float
    path.write_bytes(bytes(raw))
    calls = counted["calls"]
    with pytest.warns(UserWarning, match="failed verification.*sha256"):
        again, _ = features.image_features(ds, model, params, **kwargs)
    assert counted["calls"] > calls
    np.testing.assert_array_equal(again, feats)


def test_text_features_ensemble_and_cache(tiny_clip, tmp_path, monkeypatch):
    folder, model, params = tiny_clip
    tokenizer = clip.load_tokenizer(folder)
    names, templates = ["red circle", "square", "star"], ("a photo of a {}.", "{}", "art of {}")
    wid = feature_cache.weights_id(folder)
    text = features.text_features(
        names,
        model,
        params,
        tokenizer,
        templates=templates,
        cache_dir=tmp_path,
        weights_id=wid,
        batch_size=4,
    )
    # NumPy reference: normalise each prompt's embedding, average per class, renormalise.
    prompts = [t.format(n) for n in names for t in templates]
    raw = np.asarray(model.apply({"params": params}, tokenizer(prompts), method=model.encode_text))
    raw = raw.astype(np.float64).reshape(3, 3, -1)
    mean = (raw / np.linalg.norm(raw, axis=-1, keepdims=True)).mean(1)
    expected = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    assert text.shape == (3, model.embed_dim) and text.dtype == np.float32
    np.testing.assert_allclose(text, expected, atol=1e-5)
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("cache hit must not encode"))
    cached = features.text_features(
        names, model, params, tokenizer, templates=templates, cache_dir=tmp_path, weights_id=wid
    )
    np.testing.assert_array_equal(cached, text)
    with pytest.raises(ValueError, match="'{}'"):
        features.text_features(
            names,
            model,
            params,
            tokenizer,
            templates=("no slot",),
            cache_dir=tmp_path,
            weights_id=wid,
        )


def test_weights_id_is_the_file_sha256(tiny_clip, tmp_path):
    folder, _, _ = tiny_clip
    expected = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert feature_cache.weights_id(folder) == expected
    assert feature_cache.weights_id(folder / "model.safetensors") == expected
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        feature_cache.weights_id(tmp_path / "empty")
