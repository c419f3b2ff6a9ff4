"""Wav2Vec2 and HuBERT in Flax NNX, laid out like transformers' `modeling_wav2vec2` / `modeling_hubert`.

Both read raw audio, `input_values` (B, S) float at the feature extractor's rate (16 kHz), with an
optional `attention_mask` (B, S) 1/0 for right-padded batches. The blocks, named as in the
checkpoints:

- `feature_extractor.conv_layers.i`: 1-D convolutions over the waveform (kernel `conv_kernel[i]`,
  stride `conv_stride[i]`, `conv_dim[i]` channels) with GELU. `feat_extract_norm: group` (the base
  layout): the first layer has a GroupNorm with one group per channel (each channel normalised over
  time, padding included, as transformers does); `layer` (the large "lv60" layout): a LayerNorm
  over channels after every convolution. Kernels are stored as flax lays out convolutions,
  (k, in, out); transformers' are (out, in, k) (params.py converts).
- `feature_projection`: LayerNorm (HuBERT: when `feat_proj_layer_norm`) and `projection` to
  `hidden_size`.
- `masked_spec_embed`: the learned vector SpecAugment writes over masked frames (present when
  `mask_time_prob` or `mask_feature_prob` is > 0).
- `encoder.pos_conv_embed.conv`: the convolutional relative positional embedding, a grouped
  convolution (`num_conv_pos_embeddings` wide, `num_conv_pos_embedding_groups` groups) whose weight
  is weight-normalised over the kernel axis: w = g * v / ||v||, norms per kernel position
  (PyTorch's `weight_norm(dim=2)`); g and v are the parameters (`weight_g` (k,), `weight_v`
  (k, in/groups, out)).
- `encoder.layers.i`: self-attention (`q_proj`, `k_proj`, `v_proj`, `out_proj`) and a feed-forward
  block (`intermediate_dense`, `output_dense`). `do_stable_layer_norm: false` (base): post-norm
  layers and the encoder's `layer_norm` after the positional embedding; `true` (lv60): pre-norm
  layers and the encoder's `layer_norm` at the end.

Frames: a waveform of S samples gives T = conv_output_length(S) frames (320x fewer with the
default convolutions); padded samples give padded frames (`feature_mask`), which are zeroed before
the positional convolution and never attended to.

Training mode (`deterministic=False`, `rngs=` a key) applies, as transformers does when training:
dropout, LayerDrop (`layerdrop`: each layer skipped with that probability) and SpecAugment
(`apply_spec_augment`): spans of `mask_time_length` frames replaced by `masked_spec_embed`
(`mask_time_prob`, at least `mask_time_min_masks` spans) and spans of `mask_feature_length`
channels zeroed over all frames (`mask_feature_prob`), drawn from the key, so a train step stays a
pure function and a resumed run draws the same masks. Spans are drawn as in transformers'
`_compute_mask_indices` (distinct start frames, the count rounded with one random offset per
batch); a sequence shorter than a span gets none (transformers raises instead).

Shapes in names: B batch, S samples, T frames, C conv channels, D hidden, K kernel width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import JaxtuneError, ModelLoadError
from jaxtune.models.activations import activation
from jaxtune.models.config import ConfigBase
from jaxtune.models.dropout import Dropout, KeySplitter, as_key
from jaxtune.models.heads import run_base
from jaxtune.models.layers import attention_bias, call_layer, layer_norm, linear, normal, self_attention
from jaxtune.models.outputs import ModelOutput

FEATURE_NORMS = ("group", "layer")
CTC_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class Wav2Vec2Config(ConfigBase):
    """transformers' Wav2Vec2Config fields and defaults that the encoder and CTC head use.

    The pre-training fields (quantizer, contrastive loss) and other heads' fields stay in `extra`
    and are written back on export.
    """

    model_type: ClassVar[str] = "wav2vec2"
    activation_fields: ClassVar[tuple[str, ...]] = ("hidden_act", "feat_extract_activation")

    vocab_size: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    activation_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_proj_dropout: float = 0.0
    final_dropout: float = 0.1
    layerdrop: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    apply_spec_augment: bool = True
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0
    ctc_loss_reduction: str = "sum"
    ctc_zero_infinity: bool = False
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    add_adapter: bool = False
    adapter_attn_dim: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        name = self.model_type
        if not len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel) > 0:
            raise ModelLoadError(
                f"{name}: conv_dim, conv_stride and conv_kernel must have the same (non-zero) length, got "
                f"{len(self.conv_dim)}, {len(self.conv_stride)} and {len(self.conv_kernel)}")
        if self.feat_extract_norm not in FEATURE_NORMS:
            raise ModelLoadError(f"{name}: feat_extract_norm '{self.feat_extract_norm}' is not one of "
                                 f"{', '.join(FEATURE_NORMS)}")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ModelLoadError(f"{name}: hidden_size {self.hidden_size} is not a multiple of "
                                 f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}")
        if self.add_adapter or self.adapter_attn_dim is not None:
            raise ModelLoadError(f"{name}: adapters (add_adapter, adapter_attn_dim) are not supported")
        if self.ctc_loss_reduction not in CTC_REDUCTIONS:
            raise ModelLoadError(f"{name}: ctc_loss_reduction '{self.ctc_loss_reduction}' is not one of "
                                 f"{', '.join(CTC_REDUCTIONS)}")
        if not 0 <= self.layerdrop < 1:
            raise ModelLoadError(f"{name}: layerdrop must be in [0, 1), got {self.layerdrop}")

    @property
    def has_masked_spec_embed(self) -> bool:
        return self.mask_time_prob > 0 or self.mask_feature_prob > 0

    @property
    def receptive_field(self) -> int:
        """The fewest samples that give one frame."""
        n = 1
        for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
            n = (n - 1) * s + k
        return n

    def frames(self, samples):
        """Frames the feature encoder makes of `samples` (an int or an int array): transformers'
        `_get_feat_extract_output_lengths`."""
        for k, s in zip(self.conv_kernel, self.conv_stride):
            samples = (samples - k) // s + 1
        return samples

    def to_hf(self) -> dict:
        out = super().to_hf()
        out["num_feat_extract_layers"] = len(self.conv_dim)  # transformers derives it; keep it true
        return out


@dataclass(frozen=True)
class HubertConfig(Wav2Vec2Config):
    """transformers' HubertConfig: Wav2Vec2's fields plus `feat_proj_layer_norm`."""

    model_type: ClassVar[str] = "hubert"

    feat_proj_layer_norm: bool = True
    conv_pos_batch_norm: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.conv_pos_batch_norm:
            raise ModelLoadError("hubert: conv_pos_batch_norm=true (a BatchNorm positional embedding) is not supported")


def conv1d(x_BTC, kernel_KIO, stride: int = 1, padding=((0, 0),), groups: int = 1):
    """PyTorch's Conv1d on channels-last input: (B, T, Cin) x (k, Cin/groups, Cout) -> (B, T', Cout)."""
    return jax.lax.conv_general_dilated(
        x_BTC, kernel_KIO, window_strides=(stride,), padding=padding,
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)


class Conv(nnx.Module):
    """A Conv1d's parameters: `kernel` (k, in/groups, out), optional `bias` (out,)."""

    def __init__(self, cfg: Wav2Vec2Config, din: int, dout: int, width: int, axes: tuple, *, rngs: nnx.Rngs,
                 use_bias: bool, groups: int = 1):
        std = math.sqrt(2.0 / (din // groups * width))  # kaiming normal, as transformers initialises
        self.kernel = nnx.Param(normal(std)(rngs.params(), (width, din // groups, dout), cfg.param_dtype),
                                logical_axes=(None, *axes))
        self.bias = nnx.Param(jnp.zeros((dout,), cfg.param_dtype), logical_axes=(axes[1],)) if use_bias else None

    def __call__(self, x_BTC, stride: int):
        y = conv1d(x_BTC, self.kernel[...].astype(x_BTC.dtype), stride)
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


class ChannelNorm(nnx.Module):
    """PyTorch's GroupNorm with one group per channel: each channel normalised over time (eps 1e-5)."""

    def __init__(self, cfg: Wav2Vec2Config, channels: int):
        self.scale = nnx.Param(jnp.ones((channels,), cfg.param_dtype), logical_axes=("conv",))
        self.bias = nnx.Param(jnp.zeros((channels,), cfg.param_dtype), logical_axes=("conv",))

    def __call__(self, x_BTC):
        x = x_BTC.astype(jnp.float32)
        mean = x.mean(axis=1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...]
        return y.astype(x_BTC.dtype)


class FeatureConvLayer(nnx.Module):
    """One convolution of the feature encoder, its norm (`norm`: 'group', 'layer' or None) and GELU."""

    def __init__(self, cfg: Wav2Vec2Config, i: int, norm: Optional[str], *, rngs: nnx.Rngs):
        din = cfg.conv_dim[i - 1] if i > 0 else 1
        dout, self.stride = cfg.conv_dim[i], cfg.conv_stride[i]
        self.conv = Conv(cfg, din, dout, cfg.conv_kernel[i], (None if i == 0 else "conv", "conv"), rngs=rngs,
                         use_bias=cfg.conv_bias)
        if norm == "group":
            self.layer_norm = ChannelNorm(cfg, dout)
        elif norm == "layer":  # nn.LayerNorm(out) with PyTorch's default eps
            self.layer_norm = layer_norm(cfg, dout, 1e-5, rngs=rngs, axis="conv")
        else:
            self.layer_norm = None
        self.act = activation(cfg.feat_extract_activation)

    def __call__(self, x_BTC):
        x = self.conv(x_BTC, self.stride)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.act(x)


class Wav2Vec2FeatureEncoder(nnx.Module):
    """`conv_layers`: waveform (B, S) -> features (B, T, conv_dim[-1])."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        n = len(cfg.conv_dim)
        norms = ["layer"] * n if cfg.feat_extract_norm == "layer" else ["group"] + [None] * (n - 1)
        self.conv_layers = nnx.List([FeatureConvLayer(cfg, i, norms[i], rngs=rngs) for i in range(n)])

    def __call__(self, input_values_BS):
        x = input_values_BS.astype(self.cfg.activation_dtype)[..., None]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class Wav2Vec2FeatureProjection(nnx.Module):
    """`layer_norm` (optional for HuBERT) and `projection` to the hidden size, then dropout."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        C = cfg.conv_dim[-1]
        use_norm = getattr(cfg, "feat_proj_layer_norm", True)
        self.layer_norm = layer_norm(cfg, C, cfg.layer_norm_eps, rngs=rngs, axis="conv") if use_norm else None
        self.projection = linear(cfg, C, cfg.hidden_size, ("conv", "embed"), rngs=rngs, std=cfg.initializer_range)
        self.dropout = Dropout(cfg.feat_proj_dropout)

    def __call__(self, x_BTC, *, deterministic, rng):
        if self.layer_norm is not None:
            x_BTC = self.layer_norm(x_BTC)
        return self.dropout(self.projection(x_BTC), deterministic=deterministic, rng=rng)


class WeightNormConv(nnx.Module):
    """The positional convolution's parameters: `weight_g` (k,), `weight_v` (k, D/groups, D), `bias`."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        D, K, G = cfg.hidden_size, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups
        std = 2 * math.sqrt(1 / (K * D))  # transformers' init of this convolution
        v = normal(std)(rngs.params(), (K, D // G, D), cfg.param_dtype)
        self.weight_v = nnx.Param(v, logical_axes=(None, None, "embed"))
        self.weight_g = nnx.Param(jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2))), logical_axes=(None,))
        self.bias = nnx.Param(jnp.zeros((D,), cfg.param_dtype), logical_axes=("embed",))

    def weight(self):
        """w = g * v / ||v||, the norm over everything but the kernel axis (weight_norm dim=2)."""
        v = self.weight_v[...].astype(jnp.float32)
        norm_K = jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2)))
        return v * (self.weight_g[...].astype(jnp.float32) / norm_K)[:, None, None]


class Wav2Vec2PositionalConvEmbedding(nnx.Module):
    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        self.conv = WeightNormConv(cfg, rngs=rngs)
        self.width, self.groups = cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups
        self.act = activation(cfg.feat_extract_activation)

    def __call__(self, x_BTD):
        pad = self.width // 2
        w = self.conv.weight().astype(x_BTD.dtype)
        y = conv1d(x_BTD, w, padding=((pad, pad),), groups=self.groups) + self.conv.bias[...].astype(x_BTD.dtype)
        if self.width % 2 == 0:  # transformers' SamePadLayer drops the last frame
            y = y[:, :-1]
        return self.act(y)


class Wav2Vec2Attention(nnx.Module):
    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        D, std = cfg.hidden_size, cfg.initializer_range
        self.num_heads = cfg.num_attention_heads
        self.q_proj = linear(cfg, D, D, ("embed", "heads"), rngs=rngs, std=std)
        self.k_proj = linear(cfg, D, D, ("embed", "heads"), rngs=rngs, std=std)
        self.v_proj = linear(cfg, D, D, ("embed", "heads"), rngs=rngs, std=std)
        self.out_proj = linear(cfg, D, D, ("heads", "embed"), rngs=rngs, std=std)
        self.dropout_rate = cfg.attention_dropout

    def __call__(self, x_BTD, bias, *, deterministic, rng):
        h = self_attention(self.q_proj, self.k_proj, self.v_proj, x_BTD, bias, self.num_heads,
                           dropout_rate=self.dropout_rate, deterministic=deterministic, rng=rng)
        return self.out_proj(h)


class Wav2Vec2FeedForward(nnx.Module):
    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        D, F, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.intermediate_dense = linear(cfg, D, F, ("embed", "mlp"), rngs=rngs, std=std)
        self.output_dense = linear(cfg, F, D, ("mlp", "embed"), rngs=rngs, std=std)
        self.act = activation(cfg.hidden_act)
        self.intermediate_dropout = Dropout(cfg.activation_dropout)
        self.output_dropout = Dropout(cfg.hidden_dropout)

    def __call__(self, x_BTD, *, deterministic, keys):
        h = self.intermediate_dropout(self.act(self.intermediate_dense(x_BTD)), deterministic=deterministic,
                                      rng=keys())
        return self.output_dropout(self.output_dense(h), deterministic=deterministic, rng=keys())


class Wav2Vec2EncoderLayer(nnx.Module):
    """Post-norm (`stable` False): LN(x + attn(x)), then LN(x + ff(x)); pre-norm (`stable` True,
    transformers' ...StableLayerNorm): x + attn(LN(x)), then x + ff(LN(x))."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.stable = cfg.do_stable_layer_norm
        self.attention = Wav2Vec2Attention(cfg, rngs=rngs)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.layer_norm = layer_norm(cfg, D, cfg.layer_norm_eps, rngs=rngs)
        self.feed_forward = Wav2Vec2FeedForward(cfg, rngs=rngs)
        self.final_layer_norm = layer_norm(cfg, D, cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x_BTD, bias, rng, *, deterministic):
        keys = KeySplitter(rng)
        h = self.layer_norm(x_BTD) if self.stable else x_BTD
        h = self.attention(h, bias, deterministic=deterministic, rng=keys())
        x_BTD = x_BTD + self.dropout(h, deterministic=deterministic, rng=keys())
        if self.stable:
            return x_BTD + self.feed_forward(self.final_layer_norm(x_BTD), deterministic=deterministic, keys=keys)
        x_BTD = self.layer_norm(x_BTD)
        return self.final_layer_norm(x_BTD + self.feed_forward(x_BTD, deterministic=deterministic, keys=keys))


class Wav2Vec2Encoder(nnx.Module):
    """`pos_conv_embed`, `layer_norm` and `layers` (both layouts; see Wav2Vec2EncoderLayer)."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        self.stable, self.layerdrop, self.remat = cfg.do_stable_layer_norm, cfg.layerdrop, cfg.remat
        self.pos_conv_embed = Wav2Vec2PositionalConvEmbedding(cfg, rngs=rngs)
        self.layer_norm = layer_norm(cfg, cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.layers = nnx.List([Wav2Vec2EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x_BTD, mask_BT, *, deterministic, keys, output_hidden_states=False):
        bias = None
        if mask_BT is not None:  # padded frames are zero before the positional convolution
            x_BTD = jnp.where(mask_BT[..., None].astype(bool), x_BTD, 0).astype(x_BTD.dtype)
            bias = attention_bias(mask_BT, x_BTD.dtype)
        x_BTD = x_BTD + self.pos_conv_embed(x_BTD)
        if not self.stable:
            x_BTD = self.layer_norm(x_BTD)
        x_BTD = self.dropout(x_BTD, deterministic=deterministic, rng=keys())
        hidden = [x_BTD]
        for layer in self.layers:
            rng = keys()
            y = call_layer(self.remat, layer, x_BTD, bias, rng, deterministic=deterministic)
            if not deterministic and self.layerdrop > 0:  # LayerDrop: skip the layer with that probability
                skip = jax.random.uniform(jax.random.fold_in(rng, 0x1D)) < self.layerdrop
                y = jnp.where(skip, x_BTD, y)
            x_BTD = y
            hidden.append(x_BTD)
        if self.stable:
            x_BTD = self.layer_norm(x_BTD)
        return x_BTD, (tuple(hidden) if output_hidden_states else None)


def span_mask(rng, lengths_B, size: int, prob: float, span: int, min_spans: int):
    """(B, size) bool: SpecAugment spans as transformers' `_compute_mask_indices` draws them.

    Each row gets int(prob * length / span + eps) spans (eps one uniform number for the batch, at
    least `min_spans`, at most what fits), of `span` positions starting at distinct positions in
    [0, length - span]; spans may overlap. Rows only mask within their `lengths_B`.
    """
    B = lengths_B.shape[0]
    if span > size or prob <= 0 and min_spans <= 0:
        return jnp.zeros((B, size), bool)
    k_eps, k_pos = jax.random.split(rng)
    eps = jax.random.uniform(k_eps)

    def num_spans(length):
        n = jnp.maximum(jnp.floor(prob * length / span + eps).astype(jnp.int32), min_spans)
        n = jnp.where(n * span > size, size // span, n)
        return jnp.minimum(n, jnp.maximum(length - (span - 1), 0))

    n_B = num_spans(lengths_B.astype(jnp.int32))
    starts_ok_BT = jnp.arange(size)[None, :] < (lengths_B[:, None] - (span - 1))
    score_BT = jnp.where(starts_ok_BT, jax.random.uniform(k_pos, (B, size)), -1.0)
    rank_BT = jnp.argsort(jnp.argsort(-score_BT, axis=1), axis=1)  # 0 = the highest score
    start_BT = starts_ok_BT & (rank_BT < n_B[:, None])
    # position t is masked when a span starts in (t - span, t]
    c = jnp.cumsum(start_BT.astype(jnp.int32), axis=1)
    before = jnp.pad(c, ((0, 0), (span, 0)))[:, :size]
    return (c - before) > 0


class Wav2Vec2Model(nnx.Module):
    """The bare model: `last_hidden_state` (B, T, D) and, when asked, `hidden_states` (the
    encoder's input and each layer's output, as transformers returns them: for the pre-norm layout
    the last one is before the final `layer_norm`)."""

    hf_architecture = "Wav2Vec2Model"

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.feature_extractor = Wav2Vec2FeatureEncoder(cfg, rngs=rngs)
        self.feature_projection = Wav2Vec2FeatureProjection(cfg, rngs=rngs)
        if cfg.has_masked_spec_embed:
            self.masked_spec_embed = nnx.Param(
                jax.random.uniform(rngs.params(), (cfg.hidden_size,), cfg.param_dtype), logical_axes=("embed",))
        else:
            self.masked_spec_embed = None
        self.encoder = Wav2Vec2Encoder(cfg, rngs=rngs)

    def feature_mask(self, attention_mask_BS, frames: int):
        """(B, T) int32: 1 for the frames made from real samples (transformers'
        `_get_feature_vector_attention_mask`)."""
        lengths_B = self.config.frames(jnp.sum(attention_mask_BS.astype(jnp.int32), axis=-1))
        return (jnp.arange(frames)[None, :] < lengths_B[:, None]).astype(jnp.int32)

    def spec_augment(self, x_BTD, mask_BT, rng):
        """SpecAugment in training mode: time spans -> masked_spec_embed, channel spans -> 0."""
        cfg = self.config
        B, T, D = x_BTD.shape
        k_time, k_feat = jax.random.split(rng)
        if cfg.mask_time_prob > 0:
            lengths = jnp.full((B,), T) if mask_BT is None else jnp.sum(mask_BT, axis=-1)
            time_BT = span_mask(k_time, lengths, T, cfg.mask_time_prob, cfg.mask_time_length, cfg.mask_time_min_masks)
            x_BTD = jnp.where(time_BT[..., None], self.masked_spec_embed[...].astype(x_BTD.dtype), x_BTD)
        if cfg.mask_feature_prob > 0:
            feat_BD = span_mask(k_feat, jnp.full((B,), D), D, cfg.mask_feature_prob, cfg.mask_feature_length,
                                cfg.mask_feature_min_masks)
            x_BTD = jnp.where(feat_BD[:, None, :], 0, x_BTD).astype(x_BTD.dtype)
        return x_BTD

    def __call__(self, input_values=None, attention_mask=None, *, deterministic: bool = True, rngs=None,
                 output_hidden_states: bool = False) -> ModelOutput:
        cfg = self.config
        if input_values is None:
            raise JaxtuneError(f"{type(self).__name__} takes input_values (batch, samples)")
        if input_values.ndim != 2:
            raise JaxtuneError(f"{cfg.model_type}: input_values must be (batch, samples), got shape "
                               f"{tuple(input_values.shape)}")
        if input_values.shape[1] < cfg.receptive_field:
            raise JaxtuneError(f"{cfg.model_type}: {input_values.shape[1]} samples are fewer than the feature "
                               f"encoder's receptive field ({cfg.receptive_field} samples, one frame)")
        keys = KeySplitter(None if deterministic else as_key(rngs))
        features_BTC = self.feature_extractor(input_values)
        mask_BT = None if attention_mask is None else self.feature_mask(attention_mask, features_BTC.shape[1])
        x_BTD = self.feature_projection(features_BTC, deterministic=deterministic, rng=keys())
        augment_key = keys()
        if not deterministic and cfg.apply_spec_augment and cfg.has_masked_spec_embed:
            x_BTD = self.spec_augment(x_BTD, mask_BT, augment_key)
        x_BTD, hidden = self.encoder(x_BTD, mask_BT, deterministic=deterministic, keys=keys,
                                     output_hidden_states=output_hidden_states)
        return ModelOutput(last_hidden_state=x_BTD, hidden_states=hidden)


class Wav2Vec2ForCTC(nnx.Module):
    """The base model, dropout (`final_dropout`) and `lm_head` (D -> vocab_size): per-frame logits
    (B, T, vocab) for CTC, the blank being `pad_token_id` (as transformers' loss uses it)."""

    hf_architecture = "Wav2Vec2ForCTC"
    base_prefix: ClassVar[str] = "wav2vec2"
    base_cls: ClassVar[type] = Wav2Vec2Model

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        setattr(self, self.base_prefix, self.base_cls(cfg, rngs=rngs))
        self.dropout = Dropout(cfg.final_dropout)
        self.lm_head = linear(cfg, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs=rngs,
                              std=cfg.initializer_range)

    def __call__(self, input_values=None, attention_mask=None, *, deterministic: bool = True, rngs=None,
                 output_hidden_states: bool = False) -> ModelOutput:
        out, keys = run_base(getattr(self, self.base_prefix), input_values, attention_mask,
                             deterministic=deterministic, rngs=rngs, output_hidden_states=output_hidden_states)
        h = self.dropout(out.last_hidden_state, deterministic=deterministic, rng=keys())
        return out.replace(logits=self.lm_head(h).astype(jnp.float32))


class HubertModel(Wav2Vec2Model):
    hf_architecture = "HubertModel"


class HubertForCTC(Wav2Vec2ForCTC):
    hf_architecture = "HubertForCTC"
    base_prefix: ClassVar[str] = "hubert"
    base_cls: ClassVar[type] = HubertModel


# task -> head class, per model_type (jaxtune.models.wav2vec2.FAMILIES)
HEADS = {"base": Wav2Vec2Model, "ctc": Wav2Vec2ForCTC}
HUBERT_HEADS = {"base": HubertModel, "ctc": HubertForCTC}
