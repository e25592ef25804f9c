"""Public CLIP facade: `from calfuse_jax import clip`.

    model, params = clip.from_pretrained("openai/clip-vit-base-patch16")  # or a local folder
    tokenizer = clip.load_tokenizer("openai/clip-vit-base-patch16")
    pixels = clip.preprocess(images, model.image_size)                    # [B, H, W, 3] float32
    image_emb = model.apply({"params": params}, pixels, method=model.encode_image)      # [B, D]
    text_emb = model.apply({"params": params}, tokenizer(names), method=model.encode_text)  # [B, D]

Embeddings are not L2-normalised (as transformers' get_image_features).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from calfuse_jax.feature_cache import PRETRAINED_WEIGHT_FILES
from calfuse_jax.models.clip import CLIP, VARIANTS, CLIPArch, init_params, pool_index
from calfuse_jax.models.convert import (
    CheckpointError,
    arch_from_config,
    config_from_arch,
    from_state_dict,
    load_folder,
    to_state_dict,
)
from calfuse_jax.models.hub import HubUnreachableError, resolve
from calfuse_jax.preprocess import CLIP_MEAN, CLIP_STD, preprocess
from calfuse_jax.tokenizer import TOKENIZER_FILES, ClipTokenizer, tokenizer_from_folder

__all__ = ["CLIP", "CLIPArch", "CLIP_MEAN", "CLIP_STD", "CheckpointError", "ClipTokenizer",
           "HubUnreachableError", "VARIANTS", "arch_from_config", "from_pretrained",
           "from_state_dict", "init_params", "load_tokenizer", "logit_scale", "pool_index",
           "preprocess", "random_checkpoint", "to_state_dict"]  # fmt: skip


def from_pretrained(
    path_or_hub_id: str | os.PathLike,
    dtype: jnp.dtype = jnp.float32,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[CLIP, dict]:
    """(Linen CLIP module computing in `dtype`, float32 params) from a folder or hub id, strictly.

    Raises CheckpointError naming every missing / unexpected / mis-shaped tensor, a non-CLIP
    config, or (offline, uncached) the files needed and where to put them.
    """
    folder = resolve(path_or_hub_id, ("config.json",), PRETRAINED_WEIGHT_FILES, cache_dir)
    arch, params = load_folder(folder)
    return CLIP(arch, dtype=dtype), params


def load_tokenizer(
    path_or_hub_id: str | os.PathLike,
    context_length: int = 77,
    cache_dir: str | os.PathLike | None = None,
) -> ClipTokenizer:
    """CLIP tokenizer from a checkpoint folder or hub id: `tokenizer(texts) -> int32 [B, 77]`."""
    try:
        folder = resolve(path_or_hub_id, TOKENIZER_FILES, (), cache_dir)
    except CheckpointError as err:  # same type (HubUnreachableError stays one), tokenizer wording
        raise type(err)(str(err).replace("Needed files", "Tokenizer files")) from err
    return tokenizer_from_folder(folder, context_length)


def logit_scale(params: dict) -> float:
    """exp(logit_scale) of a checkpoint (100.0 for OpenAI CLIP)."""
    return float(np.exp(np.asarray(params["logit_scale"], np.float64)))


def random_checkpoint(
    folder: str | os.PathLike, variant: str | CLIPArch = "tiny", seed: int = 0
) -> Path:
    """Writes a complete random HF CLIP folder for `variant` (our Flax init, `seed`) without torch;
    returns it. The byte-level tokenizer (522 tokens, EOT last) sets the text vocabulary."""
    from safetensors.numpy import save_file

    from calfuse_jax.tokenizer import write_vocab_files

    arch = VARIANTS[variant] if isinstance(variant, str) else variant
    folder = Path(folder)
    vocab_size = write_vocab_files(folder)
    arch = dataclasses.replace(arch, vocab_size=vocab_size, eos_token_id=vocab_size - 1)
    config_from_arch(arch).save_pretrained(folder)
    state = to_state_dict(init_params(arch, seed))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
