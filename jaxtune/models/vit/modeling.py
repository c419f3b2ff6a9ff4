"""ViT in Flax NNX, laid out like the checkpoints of transformers' `modeling_vit`.

Checkpoints (those transformers 5 writes too) name the blocks `encoder.layer.i` with BERT's names:
`attention.attention.{query,key,value}`, `attention.output.dense`, `intermediate.dense`,
`output.dense`, plus pre-LN `layernorm_before` / `layernorm_after`; our modules mirror those keys.
The patch embedding is HF's Conv2d (stride = kernel = patch size), computed here as a matmul over
non-overlapping patches with the kernel stored as flax lays out convolutions: (ph, pw, C, D); HF's
weight is (D, C, ph, pw) (params.py converts).

Input: `pixel_values` (B, C, H, W), NCHW like transformers, H x W = config.image_size.
Shapes in names: B batch, P patches (+1 with CLS), D hidden, N heads, H head dim, F intermediate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import JaxtuneError, ModelLoadError
from jaxtune.models.activations import activation
from jaxtune.models.config import EncoderConfig
from jaxtune.models.dropout import Dropout, KeySplitter, as_key
from jaxtune.models.heads import run_base
from jaxtune.models.layers import LayerStack, SelfAttention, layer_norm, linear, normal
from jaxtune.models.outputs import ModelOutput


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


@dataclass(frozen=True)
class ViTConfig(EncoderConfig):
    """transformers' ViTConfig fields and defaults (`encoder_stride` and others stay in extra)."""

    model_type = "vit"

    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    image_size: Any = 224  # int or (height, width)
    patch_size: Any = 16  # int or (height, width)
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: Optional[int] = None  # None: hidden_size
    pooler_act: str = "tanh"

    activation_fields = ("hidden_act", "pooler_act")

    def __post_init__(self):
        super().__post_init__()
        (ih, iw), (ph, pw) = self.image_hw, self.patch_hw
        if ih < ph or iw < pw:
            raise ModelLoadError(f"vit: image_size {self.image_size} is smaller than patch_size {self.patch_size}")

    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _pair(self.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        (ih, iw), (ph, pw) = self.image_hw, self.patch_hw
        return ih // ph, iw // pw

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


class PatchProjection(nnx.Module):
    """The parameters of HF's Conv2d: kernel (ph, pw, C, D) and bias (D,)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        ph, pw = cfg.patch_hw
        self.kernel = nnx.Param(
            normal(cfg.initializer_range)(rngs.params(), (ph, pw, cfg.num_channels, cfg.hidden_size),
                                          cfg.param_dtype),
            logical_axes=(None, None, None, "embed"),
        )
        self.bias = nnx.Param(jnp.zeros((cfg.hidden_size,), cfg.param_dtype), logical_axes=("embed",))


class ViTPatchEmbeddings(nnx.Module):
    """`projection`: HF's Conv2d(C, D, kernel=stride=patch) as one einsum over patches."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.projection = PatchProjection(cfg, rngs=rngs)

    def __call__(self, pixel_values_BCHW):
        cfg = self.cfg
        B, C, H, W = pixel_values_BCHW.shape
        if C != cfg.num_channels:
            raise JaxtuneError(f"ViT: pixel_values have {C} channels, the model expects {cfg.num_channels}")
        if (H, W) != cfg.image_hw:
            raise JaxtuneError(
                f"ViT: pixel_values are {H}x{W}, the model expects {cfg.image_hw[0]}x{cfg.image_hw[1]} "
                "(config image_size; resize the images, interpolate_pos_encoding is not supported)"
            )
        (ph, pw), (gh, gw) = cfg.patch_hw, cfg.grid
        dtype = cfg.activation_dtype
        x = pixel_values_BCHW[:, :, : gh * ph, : gw * pw].astype(dtype)  # Conv2d drops the remainder
        x = x.reshape(B, C, gh, ph, gw, pw)
        kernel = self.projection.kernel[...].astype(dtype)
        x_BGGD = jnp.einsum("bcipjq,pqcd->bijd", x, kernel) + self.projection.bias[...].astype(dtype)
        return x_BGGD.reshape(B, gh * gw, cfg.hidden_size)


class ViTEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        D, std = cfg.hidden_size, cfg.initializer_range
        self.cls_token = nnx.Param(normal(std)(rngs.params(), (1, 1, D), cfg.param_dtype),
                                   logical_axes=(None, None, "embed"))
        self.patch_embeddings = ViTPatchEmbeddings(cfg, rngs=rngs)
        self.position_embeddings = nnx.Param(
            normal(std)(rngs.params(), (1, cfg.num_patches + 1, D), cfg.param_dtype),
            logical_axes=(None, "position", "embed"),
        )
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def __call__(self, pixel_values, *, deterministic, rng):
        x_BPD = self.patch_embeddings(pixel_values)
        B, _, D = x_BPD.shape
        cls_B1D = jnp.broadcast_to(self.cls_token[...].astype(x_BPD.dtype), (B, 1, D))
        x_BPD = jnp.concatenate([cls_B1D, x_BPD], axis=1) + self.position_embeddings[...].astype(x_BPD.dtype)
        return self.dropout(x_BPD, deterministic=deterministic, rng=rng)


class ViTDense(nnx.Module):
    """A module holding one `dense` Linear (HF's ViTSelfOutput / ViTIntermediate / ViTOutput)."""

    def __init__(self, cfg: ViTConfig, din: int, dout: int, axes: tuple, *, rngs: nnx.Rngs):
        self.dense = linear(cfg, din, dout, axes, rngs=rngs, std=cfg.initializer_range)

    def __call__(self, x):
        return self.dense(x)


class ViTAttention(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.attention = SelfAttention(cfg, rngs=rngs, use_bias=cfg.qkv_bias)
        self.output = ViTDense(cfg, cfg.hidden_size, cfg.hidden_size, ("heads", "embed"), rngs=rngs)

    def __call__(self, x_BPD, *, deterministic, rng, first_token_only=False):
        return self.output(self.attention(x_BPD, None, deterministic=deterministic, rng=rng,
                                          first_token_only=first_token_only))


class ViTLayer(nnx.Module):
    """Pre-LN block: x + attn(ln(x)), then x + mlp(ln(x)); dropout after each sub-block."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.attention = ViTAttention(cfg, rngs=rngs)
        self.intermediate = ViTDense(cfg, D, F, ("embed", "mlp"), rngs=rngs)
        self.output = ViTDense(cfg, F, D, ("mlp", "embed"), rngs=rngs)
        self.layernorm_before = layer_norm(cfg, D, cfg.layer_norm_eps, rngs=rngs)
        self.layernorm_after = layer_norm(cfg, D, cfg.layer_norm_eps, rngs=rngs)
        self.act = activation(cfg.hidden_act)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def __call__(self, x_BPD, rng, *, deterministic, first_token_only=False):
        """`first_token_only`: the output for the CLS token only, (B, 1, D) (see ViTModel)."""
        keys = KeySplitter(rng)
        full = x_BPD.shape
        h = self.attention(self.layernorm_before(x_BPD), deterministic=deterministic, rng=keys(),
                           first_token_only=first_token_only)
        x_BPD = x_BPD[:, :1] if first_token_only else x_BPD
        x_BPD = x_BPD + self.dropout(h, deterministic=deterministic, rng=keys(), within=full)
        h = self.output(self.act(self.intermediate(self.layernorm_after(x_BPD))))
        return x_BPD + self.dropout(h, deterministic=deterministic, rng=keys(), within=full)


class ViTPooler(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        out = cfg.pooler_output_size or cfg.hidden_size
        self.dense = linear(cfg, cfg.hidden_size, out, ("embed", None), rngs=rngs, std=cfg.initializer_range)
        self.act = activation(cfg.pooler_act)

    def __call__(self, x_BPD):
        return self.act(self.dense(x_BPD[:, 0]))


class ViTModel(nnx.Module):
    """The bare encoder: `last_hidden_state` (after `layernorm`) and (with the pooler) `pooler_output`.

    `hidden_states` are as transformers returns them: the embeddings and each layer's output,
    before the final layernorm. `first_token_only=True` (what the image-classification head
    passes) runs the last layer for the CLS token only: `last_hidden_state` is (B, 1, D), with the
    same values. `output_hidden_states=True` computes every token.
    """

    hf_architecture = "ViTModel"

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, add_pooling_layer: bool = True):
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg, rngs=rngs)
        self.encoder = LayerStack(cfg, ViTLayer, rngs=rngs)
        self.layernorm = layer_norm(cfg, cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)
        self.pooler = ViTPooler(cfg, rngs=rngs) if add_pooling_layer else None

    def __call__(self, pixel_values=None, *, interpolate_pos_encoding: bool = False, deterministic: bool = True,
                 rngs=None, output_hidden_states: bool = False, first_token_only: bool = False) -> ModelOutput:
        if pixel_values is None:
            raise JaxtuneError(f"{type(self).__name__} takes pixel_values (B, C, H, W)")
        if interpolate_pos_encoding:
            raise JaxtuneError("ViT: interpolate_pos_encoding=True is not supported; resize images to "
                               "config image_size")
        keys = KeySplitter(None if deterministic else as_key(rngs))
        x_BPD = self.embeddings(pixel_values, deterministic=deterministic, rng=keys())
        x_BPD, hidden = self.encoder(x_BPD, deterministic=deterministic, keys=keys,
                                     output_hidden_states=output_hidden_states,
                                     first_token_only=first_token_only and not output_hidden_states)
        x_BPD = self.layernorm(x_BPD)
        pooled = self.pooler(x_BPD) if self.pooler is not None else None
        return ModelOutput(last_hidden_state=x_BPD, pooler_output=pooled, hidden_states=hidden)


class ViTForImageClassification(nnx.Module):
    """`classifier` on the final CLS token (no pooler), as transformers.

    Returns `logits` (and `hidden_states` when asked), not `last_hidden_state`, as transformers'
    head does: the last layer runs for the CLS token alone.
    """

    hf_architecture = "ViTForImageClassification"

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.vit = ViTModel(cfg, rngs=rngs, add_pooling_layer=False)
        self.classifier = linear(cfg, cfg.hidden_size, cfg.num_labels, ("embed", "classes"), rngs=rngs,
                                 std=cfg.initializer_range)

    def __call__(self, pixel_values=None, *, interpolate_pos_encoding: bool = False, deterministic: bool = True,
                 rngs=None, output_hidden_states: bool = False) -> ModelOutput:
        out, _ = run_base(self.vit, pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                          deterministic=deterministic, rngs=rngs, output_hidden_states=output_hidden_states,
                          first_token_only=True)
        logits = self.classifier(out.last_hidden_state[:, 0]).astype(jnp.float32)
        return out.replace(logits=logits, last_hidden_state=None)


# task -> head class: the family record's table (jaxtune.models.vit.FAMILY)
HEADS = {"base": ViTModel, "image-classification": ViTForImageClassification}
