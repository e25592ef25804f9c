"""Our Flax CLIP equals transformers' PyTorch CLIPModel (the reference users trust), fp32, 1e-4.

Fixtures are random PyTorch models saved the way users get them: `save_pretrained` (safetensors)
and `torch.save(state_dict)` (.bin, with the `position_ids` buffers older snapshots carry).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from calfuse_jax import clip  # noqa: E402

TOL = 1e-4  # fp32 max-abs; observed differences are ~1e-6 (summation order only)


def _odd_config(eos_token_id: int, vision_act: str, text_act: str):
    # Non-power-of-two widths, 5 and 3 heads, 3 and 2 layers, 30x30 images with 6x6 patches:
    # a transposed kernel or a mixed-up head split cannot hide behind square shapes.
    return transformers.CLIPConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=36,
            intermediate_size=52,
            num_hidden_layers=2,
            num_attention_heads=3,
            max_position_embeddings=77,
            hidden_act=text_act,
            eos_token_id=eos_token_id,
            bos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=60,
            intermediate_size=84,
            num_hidden_layers=3,
            num_attention_heads=5,
            image_size=30,
            patch_size=6,
            hidden_act=vision_act,
        ),
        projection_dim=24,
        logit_scale_init_value=3.3,
    )


def _random_torch_model(config, seed: int, perturb_matrices: bool = True):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    # HF init leaves LayerNorm at (1, 0) and biases at 0: perturb parameters so that a swapped
    # scale/bias or a dropped bias shows up in the outputs (vectors always; matrices are already
    # random, re-randomising them only makes the small configs less regular).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "logit_scale" and (perturb_matrices or param.ndim == 1):
                param.add_(0.05 * torch.randn_like(param))
    return model


def _token_ids(rng, batch: int, vocab: int, eot: int) -> np.ndarray:
    """Random ids, EOT at varied positions and repeated after it as padding. With eot == vocab-1
    (legacy OpenAI layout) EOT is the largest id; otherwise larger ids occur before EOT, so
    first-EOT pooling and argmax pooling pick different positions and the test tells them apart."""
    ids = rng.integers(3, vocab, size=(batch, 77))
    ids[ids == eot] = 3
    for row, length in enumerate(rng.integers(2, 40, size=batch)):
        ids[row, 0] = 1
        ids[row, length:] = eot
    return ids.astype(np.int32)


def _torch_outputs(model, pixels_nhwc: np.ndarray, ids: np.ndarray, full_forward: bool = True):
    with torch.no_grad():
        pixels = torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2).copy())
        tokens = torch.from_numpy(ids.astype(np.int64))
        image = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        text = model.get_text_features(input_ids=tokens).pooler_output.numpy()
        if not full_forward:
            return image, text
        logits = model(input_ids=tokens, pixel_values=pixels).logits_per_image.numpy()
    return image, text, logits


def _our_outputs(model, params, pixels: np.ndarray, ids: np.ndarray, full_forward: bool = True):
    variables = {"params": params}
    image = jax.jit(functools.partial(model.apply, method=model.encode_image))(variables, pixels)
    text = jax.jit(functools.partial(model.apply, method=model.encode_text))(variables, ids)
    if not full_forward:
        return np.asarray(image), np.asarray(text)
    logits = jax.jit(model.apply)(variables, pixels, ids)
    return np.asarray(image), np.asarray(text), np.asarray(logits)


def _assert_parity(ours, reference):
    assert len(ours) == len(reference)
    for name, a, b in zip(("image", "text", "logits"), ours, reference, strict=False):
        assert a.shape == b.shape, name
        err = np.abs(a - b).max()
        assert err < TOL, f"{name} embeddings differ from transformers by {err:.2e}"


@pytest.mark.parametrize(
    "fmt, eos_token_id, vision_act, text_act",
    [
        # legacy OpenAI configs: eos_token_id == 2 means "pool at argmax id" (EOT = largest id)
        ("safetensors", 2, "quick_gelu", "quick_gelu"),
        # modern configs: pool at the first eos_token_id; EOT (50) is not the largest id here
        ("bin", 50, "gelu", "quick_gelu"),
    ],
)
def test_odd_config_matches_transformers(tmp_path, fmt, eos_token_id, vision_act, text_act):
    config = _odd_config(eos_token_id, vision_act, text_act)
    torch_model = _random_torch_model(config, seed=eos_token_id)
    if fmt == "safetensors":
        torch_model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    else:  # transformers 5 only writes safetensors: build the legacy .bin layout by hand
        config.save_pretrained(tmp_path)
        state = dict(torch_model.state_dict())
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        state["vision_model.embeddings.position_ids"] = torch.arange(26)[None]
        torch.save(state, tmp_path / "pytorch_model.bin")

    model, params = clip.from_pretrained(tmp_path)
    assert model.image_size == 30 and model.embed_dim == 24
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(params))
    np.testing.assert_allclose(clip.logit_scale(params), np.exp(3.3), rtol=1e-6)

    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 30, 30, 3)).astype(np.float32)
    eot = 98 if eos_token_id == 2 else eos_token_id
    ids = _token_ids(rng, batch=4, vocab=99, eot=eot)
    if eos_token_id != 2:
        assert (ids.argmax(-1) != (ids == eot).argmax(-1)).any()
    _assert_parity(
        _our_outputs(model, params, pixels, ids), _torch_outputs(torch_model, pixels, ids)
    )


def test_full_vit_b16_architecture_matches_transformers(tmp_path):
    arch = clip.VARIANTS["ViT-B/16"]
    config = transformers.CLIPConfig(
        text_config=dict(eos_token_id=2),  # as in openai/clip-vit-base-patch16's config.json
        vision_config=dict(patch_size=16),
        projection_dim=512,
    )
    torch_model = _random_torch_model(config, seed=16, perturb_matrices=False)
    torch_model.save_pretrained(tmp_path)
    model, params = clip.from_pretrained(tmp_path)
    assert clip.arch_from_config(config.to_dict()) == arch

    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(1, 224, 224, 3)).astype(np.float32)
    ids = rng.integers(0, 49406, size=(2, 77)).astype(np.int32)
    ids[:, 0] = 49406
    ids[0, 7:] = 49407
    ids[1, 20:] = 49407
    _assert_parity(
        _our_outputs(model, params, pixels, ids), _torch_outputs(torch_model, pixels, ids)
    )


def test_bf16_compute_keeps_fp32_params():
    arch = clip.VARIANTS["tiny"]
    params = clip.init_params(arch, seed=3)
    pixels = np.random.default_rng(2).normal(size=(4, 32, 32, 3)).astype(np.float32)
    outputs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = clip.CLIP(arch, dtype=dtype)
        encode = jax.jit(functools.partial(model.apply, method=model.encode_image))
        outputs[dtype] = encode({"params": params}, pixels)
    assert outputs[jnp.bfloat16].dtype == jnp.float32
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(params))
    # bf16 keeps 8 mantissa bits: about a percent of relative error, never fp32 agreement.
    diff = np.asarray(outputs[jnp.bfloat16] - outputs[jnp.float32])
    rel = np.linalg.norm(diff) / np.linalg.norm(np.asarray(outputs[jnp.float32]))
    assert 1e-4 < rel < 5e-2
