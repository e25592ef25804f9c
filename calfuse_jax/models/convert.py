"""Hugging Face CLIP checkpoints (`config.json` + safetensors, shards or `pytorch_model.bin`)
<-> our Flax parameter pytree, strictly: every tensor used, every parameter filled, else one
`CheckpointError` listing all offending names. Names map by a short table on the HF module name.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from calfuse_jax.models.clip import ACTIVATIONS, CLIPArch, param_shapes

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Non-persistent buffers older transformers versions saved; nothing else is ever skipped.
SKIPPED_BUFFERS = re.compile(r"(text|vision)_model\.embeddings\.position_ids")

_transpose = lambda w: np.ascontiguousarray(w.T)
_conv_to_hwio = lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # [O,I,H,W] -> [H,W,I,O]
_hwio_to_conv = lambda w: np.ascontiguousarray(w.transpose(3, 2, 0, 1))
_same = lambda w: w


class WeightRule(NamedTuple):
    """How the parameters of HF modules matching `pattern` convert (`*.weight` <-> a Flax leaf)."""

    pattern: str  # HF module-name regex
    to_flax: Callable  # HF layout -> Flax layout
    to_hf: Callable  # Flax layout -> HF layout


_DENSE = r"(q|k|v|out)_proj|fc1|fc2|visual_projection|text_projection"
_NORMS = r"layer_norm1|layer_norm2|pre_layrnorm|post_layernorm|final_layer_norm"
WEIGHT_RULES: tuple[WeightRule, ...] = (
    WeightRule(_DENSE, to_flax=_transpose, to_hf=_transpose),
    WeightRule(r"patch_embedding", to_flax=_conv_to_hwio, to_hf=_hwio_to_conv),
    WeightRule(r"token_embedding|position_embedding", to_flax=_same, to_hf=_same),
    WeightRule(_NORMS, to_flax=_same, to_hf=_same),
)
_UNCHANGED = WeightRule("", to_flax=_same, to_hf=_same)  # biases and TOP_LEVEL parameters
TOP_LEVEL = ("logit_scale", "class_embedding")  # bare parameters, same name on both sides


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded exactly; the message lists every offending name."""


def import_transformers():
    """`transformers`, imported without its "PyTorch was not found" notice (we never need torch)."""
    logging.getLogger("transformers").addFilter(_not_the_torch_notice)  # a no-op the second time
    import transformers

    return transformers


def _not_the_torch_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found.")


def _hf_key(path: tuple[str, ...]) -> tuple[str, WeightRule]:
    """Flax path -> (HF key, the rule converting its array)."""
    parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path]
    if parts[-1] in TOP_LEVEL or parts[-1] == "bias":
        return ".".join(parts), _UNCHANGED
    for rule in WEIGHT_RULES:
        if re.fullmatch(rule.pattern, path[-2]):
            return ".".join([*parts[:-1], "weight"]), rule
    raise KeyError(f"no HF name rule for Flax parameter {'/'.join(path)}")


def to_state_dict(params: dict) -> dict[str, np.ndarray]:
    """Flax params -> HF `CLIPModel` state dict (float32 NumPy); inverse of `from_state_dict`."""
    state = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        key, rule = _hf_key(tuple(k.key for k in path))
        state[key] = rule.to_hf(np.asarray(value, dtype=np.float32))
    return state


def from_state_dict(state: dict[str, np.ndarray], arch: CLIPArch) -> dict:
    """HF state dict -> Flax params for `arch`, strictly (see module docstring). float32 leaves."""
    expected = {path: leaf.shape for path, leaf in flatten_dict(param_shapes(arch)).items()}
    paths = {_hf_key(path)[0]: path for path in expected}
    converted, unused, wrong_shape = {}, [], {}
    for key, value in state.items():
        if SKIPPED_BUFFERS.fullmatch(key):
            continue
        if key not in paths:
            unused.append(key)
            continue
        path = paths[key]
        _, rule = _hf_key(path)
        array = rule.to_flax(np.asarray(value, dtype=np.float32))
        if array.shape != expected[path]:
            hf_shape = rule.to_hf(np.empty(expected[path], np.float32)).shape
            wrong_shape[path] = f"{key}: checkpoint {tuple(value.shape)}, model expects {hf_shape}"
            continue
        converted[path] = array
    missing = [k for k, p in paths.items() if p not in converted and p not in wrong_shape]
    problems = [
        f"{what} ({len(names)}): {sep.join(sorted(names))}"
        for what, names, sep in (
            ("missing tensors", missing, ", "),
            ("unexpected tensors", unused, ", "),
            ("shape mismatches", list(wrong_shape.values()), "; "),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            "checkpoint does not match the CLIP architecture in its config.json:\n  "
            + "\n  ".join(problems)
            + "\nFix: use the weights saved with this config.json (a CLIPModel state dict)."
        )
    return unflatten_dict(converted)


def arch_from_config(config: dict) -> CLIPArch:
    """HF `config.json` dict (model_type "clip") -> CLIPArch; defaults as in transformers."""
    model_type = config.get("model_type")
    if model_type != "clip":
        raise CheckpointError(
            f"config.json has model_type={model_type!r}, expected 'clip' (a full CLIPModel with "
            "both towers). Point from_pretrained at a CLIP checkpoint such as "
            "openai/clip-vit-base-patch16."
        )
    CLIPConfig = import_transformers().CLIPConfig  # config classes need no torch
    try:
        hf = CLIPConfig.from_dict(config)
    except Exception as err:  # transformers validates architecture fields strictly
        raise CheckpointError(f"config.json is not a valid CLIPConfig: {err}") from err
    v, t = hf.vision_config, hf.text_config
    for name, act in (("vision_config", v.hidden_act), ("text_config", t.hidden_act)):
        if act not in ACTIVATIONS:
            raise CheckpointError(
                f"{name}.hidden_act={act!r} unsupported; known: {sorted(ACTIVATIONS)}"
            )
    if not (isinstance(v.image_size, int) and isinstance(v.patch_size, int)) or v.num_channels != 3:
        raise CheckpointError(
            "only square RGB images with an int image_size / patch_size are supported, got "
            f"image_size={v.image_size!r}, patch_size={v.patch_size!r}, "
            f"num_channels={v.num_channels}"
        )
    if not isinstance(t.eos_token_id, int):
        raise CheckpointError(f"text_config.eos_token_id must be an int, got {t.eos_token_id!r}")
    return CLIPArch(
        embed_dim=hf.projection_dim,
        image_size=v.image_size,
        patch_size=v.patch_size,
        vision_width=v.hidden_size,
        vision_layers=v.num_hidden_layers,
        vision_heads=v.num_attention_heads,
        vision_mlp=v.intermediate_size,
        text_width=t.hidden_size,
        text_layers=t.num_hidden_layers,
        text_heads=t.num_attention_heads,
        text_mlp=t.intermediate_size,
        vocab_size=t.vocab_size,
        context_length=t.max_position_embeddings,
        vision_act=v.hidden_act,
        text_act=t.hidden_act,
        vision_ln_eps=float(v.layer_norm_eps),
        text_ln_eps=float(t.layer_norm_eps),
        eos_token_id=t.eos_token_id,
        logit_scale_init=float(hf.logit_scale_init_value),
    )


def config_from_arch(arch: CLIPArch, bos_token_id: int | None = None):
    """CLIPArch -> transformers.CLIPConfig (to write config.json for random checkpoints)."""
    text = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.text_width,
        intermediate_size=arch.text_mlp,
        projection_dim=arch.embed_dim,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.context_length,
        hidden_act=arch.text_act,
        layer_norm_eps=arch.text_ln_eps,
        eos_token_id=arch.eos_token_id,
        bos_token_id=arch.eos_token_id - 1 if bos_token_id is None else bos_token_id,
        pad_token_id=arch.eos_token_id,
    )
    vision = dict(
        hidden_size=arch.vision_width,
        intermediate_size=arch.vision_mlp,
        projection_dim=arch.embed_dim,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        hidden_act=arch.vision_act,
        layer_norm_eps=arch.vision_ln_eps,
    )
    return import_transformers().CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=arch.embed_dim,
        logit_scale_init_value=arch.logit_scale_init,
    )


def damaged(path: Path, error: Exception) -> CheckpointError:
    """The error for a checkpoint file that cannot be parsed: names it and the fix."""
    real = path.resolve()  # a hub download links to its cached blob: that one must go too
    linked = f" and {real}, the file it links to," if real != path.absolute() else ""
    return CheckpointError(
        f"{path} is damaged ({error}): delete it{linked} and download the checkpoint again (a "
        "hub id fetches the deleted file anew on the next run)"
    )


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of one .safetensors file as NumPy; bfloat16 files (NumPy has no bf16) via JAX."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except TypeError:  # "data type 'bfloat16' not understood"
        from safetensors.flax import load_file as load_jax

        return {k: np.asarray(v.astype(np.float32)) for k, v in load_jax(path).items()}
    except SafetensorError as error:  # a truncated or overwritten file
        raise damaged(path, error) from None


def read_json(path: Path):
    """The parsed JSON file `path` (config.json, the shard index); CheckpointError if damaged."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(path, error) from None


def read_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """Tensors of the first weight file found in `folder` (safetensors preferred over .bin)."""
    if (folder / "model.safetensors").is_file():
        return load_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_safetensors(folder / shard).items()}
    if (folder / "pytorch_model.bin").is_file():
        try:
            import torch  # only needed for legacy .bin files
        except ImportError as err:
            raise CheckpointError(
                f"{folder}/pytorch_model.bin needs torch to read; `pip install torch` or convert "
                "the checkpoint to model.safetensors"
            ) from err
        loaded = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in loaded.items()}
    raise CheckpointError(
        f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)} beside config.json"
    )


def load_folder(folder: str | os.PathLike) -> tuple[CLIPArch, dict]:
    """(arch, float32 params) from a local Hugging Face CLIP folder, strictly."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(
            f"{folder} has no config.json (found: {present or 'nothing'}). A CLIP checkpoint "
            f"folder needs config.json and one of {', '.join(WEIGHT_FILES)} (plus vocab.json and "
            "merges.txt for the tokenizer)."
        )
    arch = arch_from_config(read_json(config_file))
    return arch, from_state_dict(read_state_dict(folder), arch)
