"""Pure-functional Flax Linen CLIP: ViT image tower, causal text tower, projections, logit scale.

Parameter names mirror the Hugging Face `CLIPModel` state dict (`vision_model/encoder/layers_3/...`
<-> `vision_model.encoder.layers.3....`). Parameters are float32; `dtype` is the compute dtype;
LayerNorm and softmax run in float32. Either tower's half of the params runs its encoder alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from calfuse_jax.tokenizer import TINY_MERGES, vocab_from_merges

TINY_VOCAB_SIZE = len(vocab_from_merges(TINY_MERGES))  # `tokenizer.write_vocab_files`' default


@dataclasses.dataclass(frozen=True)
class CLIPArch:
    """Architecture of one CLIP model (hashable: a Linen field)."""

    embed_dim: int  # joint embedding width D (projection output)
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp: int
    vocab_size: int = 49408
    context_length: int = 77
    vision_act: str = "quick_gelu"
    text_act: str = "quick_gelu"
    vision_ln_eps: float = 1e-5
    text_ln_eps: float = 1e-5
    eos_token_id: int = 49407
    logit_scale_init: float = 2.6592  # log(1 / 0.07)

    @property
    def vision(self) -> Tower:
        return Tower(self.vision_width, self.vision_heads, self.vision_mlp, self.vision_layers,
                     self.vision_act, self.vision_ln_eps)  # fmt: skip

    @property
    def text(self) -> Tower:
        return Tower(self.text_width, self.text_heads, self.text_mlp, self.text_layers,
                     self.text_act, self.text_ln_eps, causal=True)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Tower:
    """One transformer stack: `CLIPArch.vision` or `CLIPArch.text`."""

    width: int
    heads: int
    mlp: int  # hidden width of the MLP
    layers: int  # depth, also the init scale of the residual projections
    activation: str
    ln_eps: float
    causal: bool = False


# fmt: off
# OpenAI's released models (legacy configs: eos_token_id == 2 pools at the largest token id).
_B = dict(embed_dim=512, vision_width=768, vision_layers=12, vision_heads=12, vision_mlp=3072,
          text_width=512, text_layers=12, text_heads=8, text_mlp=2048, eos_token_id=2)
_L = dict(embed_dim=768, vision_width=1024, vision_layers=24, vision_heads=16, vision_mlp=4096,
          text_width=768, text_layers=12, text_heads=12, text_mlp=3072, eos_token_id=2)
_TINY_VOCAB = dict(vocab_size=TINY_VOCAB_SIZE, eos_token_id=TINY_VOCAB_SIZE - 1)

VARIANTS: dict[str, CLIPArch] = {
    "ViT-B/32": CLIPArch(image_size=224, patch_size=32, **_B),
    "ViT-B/16": CLIPArch(image_size=224, patch_size=16, **_B),
    "ViT-L/14": CLIPArch(image_size=224, patch_size=14, **_L),
    "ViT-L/14-336": CLIPArch(image_size=336, patch_size=14, **_L),
    # Thousands of 32x32 images per second on 2 CPU cores (demo, tests).
    "tiny": CLIPArch(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                     vision_heads=4, vision_mlp=256, text_width=64, text_layers=2, text_heads=4,
                     text_mlp=256, **_TINY_VOCAB),
    # Deliberately odd widths / head counts / image size: catches layout bugs a square config hides.
    "tiny-odd": CLIPArch(embed_dim=24, image_size=30, patch_size=6, vision_width=60,
                         vision_layers=3, vision_heads=5, vision_mlp=84, text_width=36,
                         text_layers=2, text_heads=3, text_mlp=52, vision_act="gelu",
                         **_TINY_VOCAB),
}
# fmt: on


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # transformers "gelu" is exact erf
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def _normal(std: float) -> Callable:
    return nn.initializers.normal(stddev=std)


def _dense(features: int, std: float, dtype, name: str | None = None, **kwargs) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=_normal(std), name=name, **kwargs)


class LayerNorm(nn.Module):
    """LayerNorm in float32 whatever the compute dtype (eps inside the sqrt, as PyTorch)."""

    epsilon: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., W]
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (width,), jnp.float32)
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (HF layout)."""

    tower: Tower
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, W] -> [B, L, W]
        t = self.tower
        batch, length, _ = x.shape
        head_dim = t.width // t.heads
        in_std = t.width**-0.5 * (2 * t.layers) ** -0.5
        split = lambda y: y.reshape(batch, length, t.heads, head_dim)  # [B, L, H, hd]
        q, k, v = (
            split(_dense(t.width, in_std, self.dtype, name)(x))
            for name in ("q_proj", "k_proj", "v_proj")
        )
        # XLA attention (cuDNN flash attention on GPU when eligible); softmax is float32 inside.
        out = jax.nn.dot_product_attention(q, k, v, scale=head_dim**-0.5, is_causal=t.causal)
        out_proj = _dense(t.width, t.width**-0.5, self.dtype, "out_proj")
        return out_proj(out.reshape(batch, length, t.width))


class MLP(nn.Module):
    tower: Tower
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, W] -> [B, L, W]
        t = self.tower
        x = _dense(t.mlp, (2 * t.width) ** -0.5, self.dtype, "fc1")(x)
        x = ACTIVATIONS[t.activation](x)
        return _dense(t.width, t.width**-0.5 * (2 * t.layers) ** -0.5, self.dtype, "fc2")(x)


class EncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    tower: Tower
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, W]
        eps, dtype = self.tower.ln_eps, self.dtype
        attn = Attention(self.tower, dtype, name="self_attn")
        x = x + attn(LayerNorm(eps, dtype, name="layer_norm1")(x))
        return x + MLP(self.tower, dtype, name="mlp")(LayerNorm(eps, dtype, name="layer_norm2")(x))


class Encoder(nn.Module):
    """A stack of `EncoderLayer`s named `layers_{i}` (HF `encoder.layers.{i}`)."""

    tower: Tower
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, W]
        for i in range(self.tower.layers):
            x = EncoderLayer(self.tower, self.dtype, name=f"layers_{i}")(x)
        return x


class PatchEmbedding(nn.Module):
    """Non-overlapping patch conv as one matmul. kernel [p, p, 3, W] (HWIO, Flax conv layout)."""

    width: int
    patch: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:  # [B, H, W, 3] -> [B, N, W]
        p = self.patch
        kernel = self.param("kernel", _normal(0.02), (p, p, 3, self.width), jnp.float32)
        batch, height, width, channels = pixels.shape
        gh, gw = height // p, width // p
        patches = pixels.reshape(batch, gh, p, gw, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, gh * gw, p * p * channels).astype(self.dtype)
        return patches @ kernel.reshape(p * p * channels, self.width).astype(self.dtype)


class VisionEmbeddings(nn.Module):
    arch: CLIPArch
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:  # [B, H, W, 3] -> [B, N + 1, W]
        a, width = self.arch, self.arch.vision_width
        num_positions = (a.image_size // a.patch_size) ** 2 + 1
        cls = self.param("class_embedding", _normal(width**-0.5), (width,), jnp.float32)
        patches = PatchEmbedding(width, a.patch_size, self.dtype, name="patch_embedding")(pixels)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (patches.shape[0], 1, width))
        tokens = jnp.concatenate([cls, patches], axis=1)
        positions = nn.Embed(
            num_positions, width, embedding_init=_normal(0.02), name="position_embedding"
        )
        return tokens + positions.embedding.astype(self.dtype)[None]


class VisionTransformer(nn.Module):
    """ViT image tower up to the pooled, post-LN class token (HF `vision_model`)."""

    arch: CLIPArch
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:  # [B, H, W, 3] -> [B, Wv]
        a = self.arch
        if pixels.ndim != 4 or pixels.shape[1:] != (a.image_size, a.image_size, 3):
            raise ValueError(
                f"encode_image expects normalised pixels [B, {a.image_size}, {a.image_size}, 3] "
                f"(channels last), got shape {tuple(pixels.shape)}; use clip.preprocess(images, "
                f"model.image_size)."
            )
        x = VisionEmbeddings(a, self.dtype, name="embeddings")(pixels)
        x = LayerNorm(a.vision_ln_eps, self.dtype, name="pre_layrnorm")(x)  # sic: HF spelling
        x = Encoder(a.vision, self.dtype, name="encoder")(x)
        return LayerNorm(a.vision_ln_eps, self.dtype, name="post_layernorm")(x[:, 0])


class TextEmbeddings(nn.Module):
    arch: CLIPArch
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, token_ids: jax.Array) -> jax.Array:  # [B, L] int -> [B, L, Wt]
        a = self.arch
        tokens = nn.Embed(
            a.vocab_size, a.text_width, embedding_init=_normal(0.02), name="token_embedding"
        )
        positions = nn.Embed(
            a.context_length, a.text_width, embedding_init=_normal(0.01), name="position_embedding"
        )
        return (tokens(token_ids) + positions.embedding[: token_ids.shape[1]][None]).astype(
            self.dtype
        )


def pool_index(token_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Pooled position [B], as transformers: eos_token_id == 2 (legacy configs) at the largest
    token id, otherwise at the first eos_token_id (0 if absent)."""
    if eos_token_id == 2:
        return jnp.argmax(token_ids, axis=-1)
    return jnp.argmax((token_ids == eos_token_id).astype(jnp.int32), axis=-1)


class TextTransformer(nn.Module):
    """Causal text tower up to the final-LN state at the pooled token (HF `text_model`)."""

    arch: CLIPArch
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, token_ids: jax.Array) -> jax.Array:  # [B, L] int -> [B, Wt]
        a = self.arch
        if token_ids.ndim != 2 or token_ids.shape[1] > a.context_length:
            raise ValueError(
                f"encode_text expects token ids [B, L<= {a.context_length}], got shape "
                f"{tuple(token_ids.shape)}; use clip.load_tokenizer(...)(texts)."
            )
        x = TextEmbeddings(a, self.dtype, name="embeddings")(token_ids)
        x = Encoder(a.text, self.dtype, name="encoder")(x)
        x = LayerNorm(a.text_ln_eps, self.dtype, name="final_layer_norm")(x)
        return x[jnp.arange(x.shape[0]), pool_index(token_ids, a.eos_token_id)]


class CLIP(nn.Module):
    """CLIP with both towers. `__call__` returns logits_per_image [B_img, B_txt] (as HF).

    Attributes: `image_size`, `embed_dim`, `context_length` (from `arch`).
    """

    arch: CLIPArch
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        a, dtype = self.arch, self.dtype
        self.vision_model = VisionTransformer(a, dtype)
        self.text_model = TextTransformer(a, dtype)
        self.visual_projection = _dense(a.embed_dim, a.vision_width**-0.5, dtype, use_bias=False)
        self.text_projection = _dense(a.embed_dim, a.text_width**-0.5, dtype, use_bias=False)
        # Declared only when present, so that one tower's params alone can run its encoder.
        if self.is_initializing() or self.has_variable("params", "logit_scale"):
            self.logit_scale = self.param(
                "logit_scale", nn.initializers.constant(a.logit_scale_init), (), jnp.float32
            )

    @property
    def image_size(self) -> int:
        return self.arch.image_size

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    @property
    def context_length(self) -> int:
        return self.arch.context_length

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """Normalised pixels [B, H, W, 3] -> embeddings [B, D] (float32, not L2-normalised)."""
        return self.visual_projection(self.vision_model(pixels)).astype(jnp.float32)

    def encode_text(self, token_ids: jax.Array) -> jax.Array:
        """Token ids [B, L] -> text embeddings [B, D] (float32, not L2-normalised)."""
        return self.text_projection(self.text_model(token_ids)).astype(jnp.float32)

    def __call__(self, pixels: jax.Array, token_ids: jax.Array) -> jax.Array:
        unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        image, text = unit(self.encode_image(pixels)), unit(self.encode_text(token_ids))
        return jnp.exp(self.logit_scale) * image @ text.T  # [B_img, B_txt]


def _dummy_inputs(arch: CLIPArch, make=jnp.zeros) -> tuple:
    """(pixels [1, S, S, 3], token ids [1, L]) to trace `CLIP.init` with."""
    pixels = make((1, arch.image_size, arch.image_size, 3), jnp.float32)
    return pixels, make((1, arch.context_length), jnp.int32)


def init_params(arch: CLIPArch, seed: int = 0) -> dict:
    """Random float32 parameters for `arch` (close to transformers' CLIP init), cached per (arch,
    seed); the RngBitGenerator key compiles several times faster than threefry."""
    return jax.tree.map(lambda leaf: leaf, _init_params_cached(arch, seed))  # fresh dicts


@functools.lru_cache(maxsize=8)
def _init_params_cached(arch: CLIPArch, seed: int) -> dict:
    key = jax.random.key(seed, impl="unsafe_rbg")
    return jax.jit(CLIP(arch).init)(key, *_dummy_inputs(arch))["params"]


def param_shapes(arch: CLIPArch) -> dict:
    """Pytree of jax.ShapeDtypeStruct for every parameter of `arch`."""
    inputs = _dummy_inputs(arch, jax.ShapeDtypeStruct)
    return jax.eval_shape(CLIP(arch).init, jax.random.key(0), *inputs)["params"]
