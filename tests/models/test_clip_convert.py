"""Strict checkpoint loading: each bad checkpoint raises one clear error naming what is wrong;
random checkpoints round-trip; hub ids resolve from a local cache offline and fail fast without."""

import json
import shutil
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from calfuse_jax import clip
from calfuse_jax.models import convert


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    # One random checkpoint per module; tests that damage it work on a copy.
    return clip.random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture
def copy(tiny_folder, tmp_path):
    return shutil.copytree(tiny_folder, tmp_path / "ckpt")


def _edit_weights(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_random_checkpoint_is_complete_and_loads(tiny_folder):
    names = sorted(p.name for p in tiny_folder.iterdir())
    assert names == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["model_type"] == "clip"
    vocab = json.loads((tiny_folder / "vocab.json").read_text())
    assert config["text_config"]["vocab_size"] == len(vocab) == 522
    model, params = clip.from_pretrained(tiny_folder)
    assert (model.image_size, model.embed_dim) == (32, 32)
    expected = clip.init_params(clip.VARIANTS["tiny"], seed=0)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    tokens = clip.load_tokenizer(tiny_folder)(["the cat", "x" * 200])
    assert tokens.shape == (2, 77) and tokens.dtype == np.int32
    assert tokens[0, :6].tolist() == [
        520,
        513,
        66,
        64,
        339,
        521,
    ]  # sot, "the</w>", c, a, t</w>, eot
    assert tokens[1, 76] == 521  # truncated rows still end with EOT


def test_state_dict_round_trip_uses_hf_names(tiny_folder):
    state = load_file(tiny_folder / "model.safetensors")
    assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in state
    assert state["vision_model.embeddings.patch_embedding.weight"].shape == (64, 3, 8, 8)
    params = clip.from_state_dict(state, clip.VARIANTS["tiny"])
    back = clip.to_state_dict(params)
    assert back.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(back[key], state[key])


def test_missing_tensor(copy):
    _edit_weights(copy, lambda s: s.pop("text_model.encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(clip.CheckpointError, match=r"missing tensors \(1\): text_model"):
        clip.from_pretrained(copy)


def test_extra_tensor(copy):
    def add(state):
        state["vision_model.encoder.layers.2.mlp.fc1.weight"] = np.zeros((256, 64), np.float32)
        state["text_model.embeddings.position_ids_typo"] = np.zeros((1, 77), np.float32)

    _edit_weights(copy, add)
    with pytest.raises(clip.CheckpointError) as info:
        clip.from_pretrained(copy)
    message = str(info.value)
    assert "unexpected tensors (2)" in message
    assert "vision_model.encoder.layers.2.mlp.fc1.weight" in message
    assert (
        "text_model.embeddings.position_ids_typo" in message
    )  # only the exact buffers are skipped


def test_position_ids_buffers_are_skipped(copy):
    def add(state):
        state["text_model.embeddings.position_ids"] = np.arange(77)[None]
        state["vision_model.embeddings.position_ids"] = np.arange(17)[None]

    _edit_weights(copy, add)
    clip.from_pretrained(copy)


def test_wrong_shape(copy):
    _edit_weights(copy, lambda s: s.update({"visual_projection.weight": np.zeros((33, 64), "f4")}))
    with pytest.raises(clip.CheckpointError) as info:
        clip.from_pretrained(copy)
    message = str(info.value)
    assert "shape mismatches (1): visual_projection.weight: checkpoint (33, 64)" in message
    assert "expects (32, 64)" in message and "missing" not in message


def test_wrong_model_type(copy):
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "siglip"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(clip.CheckpointError, match="model_type='siglip', expected 'clip'"):
        clip.from_pretrained(copy)


def test_empty_folder(tmp_path):
    with pytest.raises(clip.CheckpointError, match="has no config.json .*model.safetensors"):
        clip.from_pretrained(tmp_path)


def test_config_without_weights(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(clip.CheckpointError, match="no weights in .*pytorch_model.bin"):
        clip.from_pretrained(copy)


def test_offline_unknown_hub_id_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(clip.CheckpointError) as info:
        clip.from_pretrained("nobody-here/clip-that-does-not-exist", cache_dir=tmp_path)
    assert time.monotonic() - start < 10  # no network retries
    message = str(info.value)
    assert "offline" in message and "config.json" in message and "model.safetensors" in message
    assert str(tmp_path) in message and "local folder" in message
    with pytest.raises(clip.CheckpointError, match="Tokenizer files: vocab.json, merges.txt"):
        clip.load_tokenizer("nobody-here/clip-that-does-not-exist", cache_dir=tmp_path)


def test_not_a_folder_nor_hub_id(tmp_path):
    with pytest.raises(clip.CheckpointError, match="neither a checkpoint folder nor a hub id"):
        clip.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


def test_hub_id_resolves_from_local_cache_offline(tiny_folder, tmp_path, monkeypatch):
    # The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--tiny-clip"
    shutil.copytree(tiny_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model, params = clip.from_pretrained("acme/tiny-clip", cache_dir=tmp_path)
    assert model.embed_dim == 32 and "vision_model" in params
    assert clip.load_tokenizer("acme/tiny-clip", cache_dir=tmp_path)(["of"])[0, 1] == 519


def test_arch_reads_legacy_pooling_rule():
    config = clip.VARIANTS["ViT-B/16"]
    assert config.eos_token_id == 2  # OpenAI configs: pool at the argmax id
    hf = convert.config_from_arch(clip.VARIANTS["tiny-odd"]).to_dict()
    assert clip.arch_from_config(hf) == clip.VARIANTS["tiny-odd"]


def test_pool_index_follows_transformers_rule():
    ids = np.array([[5, 9, 2, 7, 7], [1, 7, 3, 2, 2]])
    # eos_token_id == 2 (legacy): argmax id -> 9 at 1, 7 at 1 (first of the maxima)
    assert clip.pool_index(ids, 2).tolist() == [1, 1]
    # otherwise: first occurrence of eos_token_id
    assert clip.pool_index(ids, 7).tolist() == [3, 1]
    assert clip.pool_index(ids, 3).tolist() == [0, 2]  # absent -> 0, as torch argmax of zeros


def test_bfloat16_checkpoint_loads_as_float32(copy):
    import jax.numpy as jnp
    from safetensors.flax import save_file as save_jax

    state = load_file(copy / "model.safetensors")
    save_jax(
        {k: jnp.asarray(v, jnp.bfloat16) for k, v in state.items()}, copy / "model.safetensors"
    )
    _, params = clip.from_pretrained(copy)
    kernel = params["visual_projection"]["kernel"]
    assert kernel.dtype == np.float32
    rounded = np.asarray(jnp.asarray(state["visual_projection.weight"], jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(kernel, rounded.T)


def test_legacy_openai_config_reads_as_vit_b16():
    # The shape of openai/clip-vit-base-patch16's older config.json: *_config_dict, defaults
    # omitted, eos_token_id 2 (argmax pooling).
    config = {
        "model_type": "clip",
        "projection_dim": 512,
        "text_config": None,
        "vision_config": None,
        "text_config_dict": {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        "vision_config_dict": {"patch_size": 16, "hidden_size": 768, "num_attention_heads": 12,
                               "intermediate_size": 3072},
    }  # fmt: skip
    assert clip.arch_from_config(config) == clip.VARIANTS["ViT-B/16"]
