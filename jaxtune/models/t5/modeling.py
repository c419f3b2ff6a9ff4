"""T5 in Flax NNX: HF `model_type`s t5 (the original layout and v1.1 / FLAN) and mt5.

Laid out like transformers' `modeling_t5` (`shared`, `encoder.block.i.layer.{0: SelfAttention,
1: DenseReluDense}`, `decoder.block.i.layer.{0: SelfAttention, 1: EncDecAttention, 2:
DenseReluDense}`, each sub-layer with its own `layer_norm`, `{encoder,decoder}.final_layer_norm`,
`lm_head`) so checkpoints map one to one. What the configs choose:

- feed-forward `feed_forward_proj`: "relu" (T5) -> `wi`, act, `wo`; "gated-gelu" (v1.1, FLAN,
  mT5) -> act(`wi_0`) * `wi_1`, `wo` (gelu_new, as transformers maps "gated-gelu"); any
  "gated-ACT" / "ACT" of `jaxtune.models.activations`.
- no biases anywhere; RMS layer norms (T5LayerNorm: no mean, no shift, float32 variance);
  attention logits are not scaled by 1/sqrt(d_kv); positions are relative-position buckets, a
  (buckets, heads) table in block 0 of each stack, shared by its other blocks (bidirectional in
  the encoder, causal in the decoder; cross-attention has none).
- the LM head: tied to `shared` unless `tie_word_embeddings` is false (v1.1 / FLAN / mT5 config
  files say so; then `lm_head` is a parameter of its own). The decoder output is scaled by
  d_model^-0.5 before a tied head when `scale_decoder_outputs` (transformers 5's field; when a
  config.json lacks it: unless `tie_word_embeddings` is false, as transformers decides; mT5
  never scales, as transformers' MT5 code).

Heads: `seq2seq-lm` (`T5ForConditionalGeneration`) and `base` = the encoder alone
(`T5EncoderModel`, `last_hidden_state` (B, U, D)), for features.

Sharding (logical axes): q/k/v (embed, heads), o (heads, embed), wi* (embed, mlp), wo (mlp,
embed), shared (vocab, embed), lm_head (embed, vocab), layer norms (embed); the small relative
bias tables are replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ModelLoadError
from jaxtune.models.activations import activation
from jaxtune.models.config import ConfigBase
from jaxtune.models.dropout import Dropout, KeySplitter, as_key
from jaxtune.models.kernels import dot_product_attention
from jaxtune.models.layers import embed, linear
from jaxtune.models.seq2seq import (
    Seq2SeqLM,
    Seq2SeqCache,
    Seq2SeqOutput,
    causal_bias,
    decoder_slots,
    padding_bias,
    write_cache,
)

# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class T5Config(ConfigBase):
    """transformers' T5Config fields and defaults (plus the fields its configs carry that we use)."""

    model_type = "t5"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "num_heads",
                     "num_hidden_layers": "num_layers", "intermediate_size": "d_ff"}
    activation_fields = ()  # checked from feed_forward_proj in __post_init__

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    is_encoder_decoder: bool = True
    use_cache: bool = True
    pad_token_id: Optional[int] = 0
    eos_token_id: Optional[Any] = 1
    bos_token_id: Optional[int] = None
    decoder_start_token_id: Optional[int] = None  # None: pad_token_id (T5's convention)
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: Optional[Any] = None
    tie_word_embeddings: bool = True
    scale_decoder_outputs: Optional[bool] = None  # None: tie_word_embeddings is not false
    classifier_dropout: float = 0.0

    def __post_init__(self):
        # No d_model % heads check: the attention width is num_heads * d_kv.
        gated, act = self.gating
        activation(act)  # a one-line error for an unknown activation
        if self.remat:
            raise ModelLoadError(f"{self.model_type}: model.remat is not supported for encoder-decoder models yet")
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.decoder_start_token_id is None:
            object.__setattr__(self, "decoder_start_token_id", self.pad_token_id)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings is not False)

    @property
    def gating(self) -> tuple[bool, str]:
        """(gated feed-forward?, activation name) from `feed_forward_proj`, as transformers reads it."""
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ModelLoadError(f"{self.model_type}: feed_forward_proj '{self.feed_forward_proj}' is not 'ACT' "
                                 "or 'gated-ACT' (e.g. 'relu', 'gated-gelu')")
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        return len(parts) == 2, act

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),)

    @property
    def max_position_embeddings(self) -> Optional[int]:
        return None  # relative positions: no limit

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers


@dataclass(frozen=True)
class MT5Config(T5Config):
    """transformers' MT5Config: T5's fields, gated-GELU by default, 250112 tokens; never scales the
    decoder output (transformers' MT5 code has no such step)."""

    model_type = "mt5"

    vocab_size: int = 250112
    d_ff: int = 1024
    feed_forward_proj: str = "gated-gelu"
    decoder_start_token_id: Optional[int] = 0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "scale_decoder_outputs", False)


# ---------------------------------------------------------------------------------------------
# Relative positions


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int):
    """transformers' `T5Attention._relative_position_bucket` (int32, same float32 steps)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    safe = jnp.maximum(relative_position, 1).astype(jnp.float32)  # log(0) is never used (is_small)
    large = max_exact + (jnp.log(safe / max_exact) / jnp.float32(math.log(max_distance / max_exact))
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, large)


# ---------------------------------------------------------------------------------------------
# Modules


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class T5LayerNorm(nnx.Module):
    """RMS norm: x / rms(x) (float32 variance) times `scale` (HF `weight`); no mean, no bias."""

    def __init__(self, cfg: T5Config):
        self.scale = nnx.Param(jnp.ones((cfg.d_model,), cfg.param_dtype), logical_axes=("embed",))
        self.eps = cfg.layer_norm_epsilon

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class T5Attention(nnx.Module):
    """q, k, v, o without biases; unscaled logits; `relative_attention_bias` in block 0 only."""

    def __init__(self, cfg: T5Config, *, has_relative_attention_bias: bool, bidirectional: bool, rngs: nnx.Rngs):
        D, N, H, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.initializer_factor
        self.num_heads, self.head_dim, self.bidirectional = N, H, bidirectional
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        # transformers' T5 initialisation (a model from `model.config` trains as theirs would)
        self.q = linear(cfg, D, N * H, ("embed", "heads"), rngs=rngs, std=f * (D * H) ** -0.5, use_bias=False)
        self.k = linear(cfg, D, N * H, ("embed", "heads"), rngs=rngs, std=f * D ** -0.5, use_bias=False)
        self.v = linear(cfg, D, N * H, ("embed", "heads"), rngs=rngs, std=f * D ** -0.5, use_bias=False)
        self.o = linear(cfg, N * H, D, ("heads", "embed"), rngs=rngs, std=f * (N * H) ** -0.5, use_bias=False)
        self.relative_attention_bias = (
            embed(cfg, cfg.relative_attention_num_buckets, N, (None, None), rngs=rngs, std=f * D ** -0.5)
            if has_relative_attention_bias else None)
        self.dropout_rate = cfg.dropout_rate

    def position_bias(self, query_positions_T, key_length: int):
        """(1, N, T, S) float32 bias of the relative positions key - query."""
        rel_TS = jnp.arange(key_length)[None, :] - query_positions_T[:, None]
        bucket_TS = relative_position_bucket(rel_TS, bidirectional=self.bidirectional,
                                             num_buckets=self.num_buckets, max_distance=self.max_distance)
        values_TSN = self.relative_attention_bias(bucket_TS).astype(jnp.float32)
        return values_TSN.transpose(2, 0, 1)[None]

    def heads(self, h_BTD):
        return h_BTD.reshape(h_BTD.shape[0], h_BTD.shape[1], self.num_heads, self.head_dim)

    def __call__(self, x_BTD, bias, *, kv=None, deterministic, rng):
        """`kv`: (keys, values) (B, S, N, H) to attend to (cross-attention or a cache), else x's own."""
        q_BTNH = self.heads(self.q(x_BTD))
        k_BSNH, v_BSNH = kv if kv is not None else (self.heads(self.k(x_BTD)), self.heads(self.v(x_BTD)))
        out_BTNH = dot_product_attention(q_BTNH, k_BSNH.astype(q_BTNH.dtype), v_BSNH.astype(q_BTNH.dtype), bias,
                                         dropout_rate=self.dropout_rate, deterministic=deterministic, rng=rng,
                                         scale=1.0)
        return self.o(out_BTNH.reshape(x_BTD.shape[0], x_BTD.shape[1], -1))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, *, has_relative_attention_bias: bool, bidirectional: bool, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias=has_relative_attention_bias,
                                         bidirectional=bidirectional, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, x_BTD, bias, keys, *, cache_kv=None, index=None, deterministic):
        """-> (x + attention, the new cache keys/values or None)."""
        h_BTD = self.layer_norm(x_BTD)
        attn = self.SelfAttention
        new_kv = None
        if cache_kv is not None:  # write this step's keys/values, attend over every slot
            new_kv = write_cache(cache_kv, attn.heads(attn.k(h_BTD)), attn.heads(attn.v(h_BTD)), index)
        out = attn(h_BTD, bias, kv=new_kv, deterministic=deterministic, rng=keys())
        return x_BTD + self.dropout(out, deterministic=deterministic, rng=keys()), new_kv


class T5LayerCrossAttention(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.EncDecAttention = T5Attention(cfg, has_relative_attention_bias=False, bidirectional=True, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg)
        self.dropout = Dropout(cfg.dropout_rate)

    def keys_values(self, encoder_BUD):
        attn = self.EncDecAttention
        return attn.heads(attn.k(encoder_BUD)), attn.heads(attn.v(encoder_BUD))

    def __call__(self, x_BTD, kv, bias, keys, *, deterministic):
        out = self.EncDecAttention(self.layer_norm(x_BTD), bias, kv=kv, deterministic=deterministic, rng=keys())
        return x_BTD + self.dropout(out, deterministic=deterministic, rng=keys())


class T5DenseActDense(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        D, F, f = cfg.d_model, cfg.d_ff, cfg.initializer_factor
        self.wi = linear(cfg, D, F, ("embed", "mlp"), rngs=rngs, std=f * D ** -0.5, use_bias=False)
        self.wo = linear(cfg, F, D, ("mlp", "embed"), rngs=rngs, std=f * F ** -0.5, use_bias=False)
        self.act = activation(cfg.gating[1])
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, x_BTD, keys, *, deterministic):
        return self.wo(self.dropout(self.act(self.wi(x_BTD)), deterministic=deterministic, rng=keys()))


class T5DenseGatedActDense(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        D, F, f = cfg.d_model, cfg.d_ff, cfg.initializer_factor
        self.wi_0 = linear(cfg, D, F, ("embed", "mlp"), rngs=rngs, std=f * D ** -0.5, use_bias=False)
        self.wi_1 = linear(cfg, D, F, ("embed", "mlp"), rngs=rngs, std=f * D ** -0.5, use_bias=False)
        self.wo = linear(cfg, F, D, ("mlp", "embed"), rngs=rngs, std=f * F ** -0.5, use_bias=False)
        self.act = activation(cfg.gating[1])
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, x_BTD, keys, *, deterministic):
        h = self.act(self.wi_0(x_BTD)) * self.wi_1(x_BTD)
        return self.wo(self.dropout(h, deterministic=deterministic, rng=keys()))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        gated = cfg.gating[0]
        self.DenseReluDense = (T5DenseGatedActDense if gated else T5DenseActDense)(cfg, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, x_BTD, keys, *, deterministic):
        h = self.DenseReluDense(self.layer_norm(x_BTD), keys, deterministic=deterministic)
        return x_BTD + self.dropout(h, deterministic=deterministic, rng=keys())


class T5Block(nnx.Module):
    """`layer`: [self-attention, (cross-attention,) feed-forward], as HF's T5Block."""

    def __init__(self, cfg: T5Config, index: int, *, is_decoder: bool, rngs: nnx.Rngs):
        parts = [T5LayerSelfAttention(cfg, has_relative_attention_bias=index == 0, bidirectional=not is_decoder,
                                      rngs=rngs)]
        if is_decoder:
            parts.append(T5LayerCrossAttention(cfg, rngs=rngs))
        parts.append(T5LayerFF(cfg, rngs=rngs))
        self.layer = nnx.List(parts)


class T5Stack(nnx.Module):
    """The encoder or the decoder: blocks, then `final_layer_norm` (the embedding is the caller's)."""

    def __init__(self, cfg: T5Config, *, is_decoder: bool, rngs: nnx.Rngs):
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.is_decoder = is_decoder
        self.block = nnx.List([T5Block(cfg, i, is_decoder=is_decoder, rngs=rngs) for i in range(n)])
        self.final_layer_norm = T5LayerNorm(cfg)
        self.dropout = Dropout(cfg.dropout_rate)

    @property
    def relative_bias(self) -> T5Attention:
        return self.block[0].layer[0].SelfAttention

    def encode(self, x_BUD, mask_BU, keys, *, deterministic, output_hidden_states=False):
        """The encoder stack over embedded tokens -> (B, U, D) (and the hidden states)."""
        U = x_BUD.shape[1]
        bias = self.relative_bias.position_bias(jnp.arange(U), U) + padding_bias(mask_BU)
        x = self.dropout(x_BUD, deterministic=deterministic, rng=keys())
        hidden = [x]
        for block in self.block:
            x, _ = block.layer[0](x, bias, keys, deterministic=deterministic)
            x = block.layer[1](x, keys, deterministic=deterministic)
            hidden.append(x)
        x = self.dropout(self.final_layer_norm(x), deterministic=deterministic, rng=keys())
        hidden[-1] = x
        return x, (tuple(hidden) if output_hidden_states else None)

    def decode(self, x_BTD, dec_mask_BT, cross: list, enc_mask_BU, keys, *, cache: Optional[Seq2SeqCache],
               deterministic, output_hidden_states=False):
        """The decoder stack; `cross`: per block (keys, values) of the encoder output.
        -> (B, T, D), new self-attention (keys, values) per block (with a cache), hidden states."""
        T = x_BTD.shape[1]
        slot_mask, query_slots, index = decoder_slots(dec_mask_BT, cache, T)
        S = slot_mask.shape[1]
        self_bias = self.relative_bias.position_bias(query_slots, S) + causal_bias(slot_mask, query_slots)
        cross_bias = padding_bias(enc_mask_BU)
        x = self.dropout(x_BTD, deterministic=deterministic, rng=keys())
        hidden, new_kv = [x], []
        for i, block in enumerate(self.block):
            cache_kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = block.layer[0](x, self_bias, keys, cache_kv=cache_kv, index=index, deterministic=deterministic)
            new_kv.append(kv)
            x = block.layer[1](x, cross[i], cross_bias, keys, deterministic=deterministic)
            x = block.layer[2](x, keys, deterministic=deterministic)
            hidden.append(x)
        x = self.dropout(self.final_layer_norm(x), deterministic=deterministic, rng=keys())
        hidden[-1] = x
        return x, new_kv, slot_mask, (tuple(hidden) if output_hidden_states else None)


def _keys(rngs, deterministic: bool, stream: int) -> KeySplitter:
    key = None if deterministic else as_key(rngs)
    return KeySplitter(None if key is None else jax.random.fold_in(key, stream))


class T5EncoderModel(nnx.Module):
    """The encoder alone (`base`): `last_hidden_state` (B, U, D) after the final norm."""

    hf_architecture = "T5EncoderModel"

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.shared = embed(cfg, cfg.vocab_size, cfg.d_model, ("vocab", "embed"), rngs=rngs,
                            std=cfg.initializer_factor * 1.0)
        self.encoder = T5Stack(cfg, is_decoder=False, rngs=rngs)

    def encode(self, input_ids, attention_mask=None, *, deterministic: bool = True, rngs=None,
               output_hidden_states: bool = False):
        mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
        return self.encoder.encode(self.shared(input_ids), mask, _keys(rngs, deterministic, 1),
                                   deterministic=deterministic, output_hidden_states=output_hidden_states)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 deterministic: bool = True, rngs=None, output_hidden_states: bool = False) -> Seq2SeqOutput:
        h, hidden = self.encode(input_ids, attention_mask, deterministic=deterministic, rngs=rngs,
                                output_hidden_states=output_hidden_states)
        return Seq2SeqOutput(last_hidden_state=h, hidden_states=hidden)


class T5ForConditionalGeneration(Seq2SeqLM, T5EncoderModel):
    """Encoder + decoder + LM head (`seq2seq-lm`); see `jaxtune.models.seq2seq` for the interface."""

    hf_architecture = "T5ForConditionalGeneration"

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.decoder = T5Stack(cfg, is_decoder=True, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else linear(
            cfg, cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, std=cfg.initializer_factor,
            use_bias=False)

    def cross_keys_values(self, encoder_BUD) -> list:
        return [block.layer[1].keys_values(encoder_BUD) for block in self.decoder.block]

    def init_cache(self, encoder_BUD, attention_mask_BU, max_len: int) -> Seq2SeqCache:
        cfg = self.config
        return Seq2SeqCache.empty(encoder_BUD.shape[0], max_len, cfg.num_decoder_layers, cfg.num_heads, cfg.d_kv,
                                  encoder_BUD.dtype, self.cross_keys_values(encoder_BUD), attention_mask_BU)

    def lm_logits(self, h):
        cfg = self.config
        if self.lm_head is not None:
            return self.lm_head(h).astype(jnp.float32)
        if cfg.scale_decoder_outputs:
            h = h * jnp.asarray(cfg.d_model ** -0.5, h.dtype)
        return self.shared.attend(h).astype(jnp.float32)

    def decode(self, decoder_input_ids, decoder_attention_mask, encoder_BUD, attention_mask, *, cache=None,
               last_only: bool = False, deterministic: bool = True, rngs=None, output_hidden_states: bool = False):
        if cache is None:
            cross, enc_mask = self.cross_keys_values(encoder_BUD), attention_mask
        else:
            cross, enc_mask = list(zip(cache.cross_keys, cache.cross_values)), cache.encoder_mask
        dec_mask = (jnp.ones(decoder_input_ids.shape, jnp.int32) if decoder_attention_mask is None
                    else decoder_attention_mask)
        h, new_kv, slot_mask, hidden = self.decoder.decode(
            self.shared(decoder_input_ids), dec_mask, cross, enc_mask, _keys(rngs, deterministic, 2), cache=cache,
            deterministic=deterministic, output_hidden_states=output_hidden_states)
        new_cache = None
        if cache is not None:
            new_cache = cache.replace(keys=tuple(k for k, _ in new_kv), values=tuple(v for _, v in new_kv),
                                      mask=slot_mask, index=cache.index + decoder_input_ids.shape[1])
        logits = self.lm_logits(h[:, -1] if last_only else h)
        return Seq2SeqOutput(logits=logits, last_hidden_state=h, hidden_states=hidden, past_key_values=new_cache)


class MT5EncoderModel(T5EncoderModel):
    hf_architecture = "MT5EncoderModel"


class MT5ForConditionalGeneration(T5ForConditionalGeneration):
    hf_architecture = "MT5ForConditionalGeneration"


CONFIGS = {"t5": T5Config, "mt5": MT5Config}
HEADS = {
    "t5": {"base": T5EncoderModel, "seq2seq-lm": T5ForConditionalGeneration},
    "mt5": {"base": MT5EncoderModel, "seq2seq-lm": MT5ForConditionalGeneration},
}
