"""BART and Marian (OPUS-MT) in Flax NNX: one implementation of the two, HF `model_type`s bart and
marian.

Laid out like transformers' `modeling_bart` / `modeling_marian` (`model.shared`,
`model.{encoder,decoder}.embed_positions`, `.layernorm_embedding` (BART), `.layers.i.{self_attn.
{q,k,v,out}_proj, self_attn_layer_norm, (encoder_attn, encoder_attn_layer_norm,) fc1, fc2,
final_layer_norm}`, `final_logits_bias`, `lm_head`) so checkpoints map one to one. Where the two
differ, as their configs and transformers' code say:

- positions: BART learns them (a table of max_position_embeddings + 2 rows read at position + 2);
  Marian adds fixed sinusoids (sin in the first half of each vector, cos in the second; not a
  parameter, so checkpoints' copies are ignored and exports leave them out).
- `layernorm_embedding` after the embeddings: BART only.
- token embeddings times sqrt(d_model) when `scale_embedding` (Marian's configs; BART's default
  is off).
- layer norms: post-LN (x = norm(x + sublayer(x))) in both, as transformers' Bart and Marian
  layers (neither config has a pre-LN switch).

The LM head is tied to `shared` (unless `tie_word_embeddings` is false) plus `final_logits_bias`
(1, V). transformers keeps that bias as a fixed buffer; here it is a parameter (a bias a
fine-tune may move; real checkpoints hold zeros) that loads and exports under the same key.
Marian with `share_encoder_decoder_embeddings: false` (separate target vocabulary) is refused
with one line.

Heads: `seq2seq-lm` (`BartForConditionalGeneration`, `MarianMTModel`) and `base`
(`BartModel`, `MarianModel`: the decoder's `last_hidden_state` and `encoder_last_hidden_state`;
without `decoder_input_ids` the decoder reads `input_ids` shifted right, as transformers' BartModel).

Sharding (logical axes): q/k/v (embed, heads), out_proj (heads, embed), fc1 (embed, mlp), fc2
(mlp, embed), shared (vocab, embed), lm_head (embed, vocab), learned positions (position, embed),
norms (embed), final_logits_bias (None, vocab).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ModelLoadError
from jaxtune.models.activations import activation
from jaxtune.models.config import ConfigBase
from jaxtune.models.dropout import Dropout, KeySplitter, as_key
from jaxtune.models.kernels import dot_product_attention
from jaxtune.models.layers import embed, layer_norm, linear
from jaxtune.models.seq2seq import (
    Seq2SeqLM,
    Seq2SeqCache,
    Seq2SeqOutput,
    causal_bias,
    decoder_slots,
    padding_bias,
    shift_tokens_right,
    write_cache,
)

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which transformers' Bart/Marian use
LEARNED_OFFSET = 2  # BartLearnedPositionalEmbedding reads row position + 2


# ---------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class BartConfig(ConfigBase):
    """transformers' BartConfig fields and defaults."""

    model_type = "bart"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "encoder_attention_heads",
                     "num_hidden_layers": "encoder_layers"}
    activation_fields = ("activation_function",)

    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    encoder_layers: int = 12
    encoder_ffn_dim: int = 4096
    encoder_attention_heads: int = 16
    decoder_layers: int = 12
    decoder_ffn_dim: int = 4096
    decoder_attention_heads: int = 16
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    activation_function: str = "gelu"
    d_model: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    classifier_dropout: float = 0.0
    scale_embedding: bool = False
    use_cache: bool = True
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[Any] = 2
    is_encoder_decoder: bool = True
    decoder_start_token_id: Optional[int] = 2
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: Optional[Any] = 2
    tie_word_embeddings: bool = True

    learned_positions = True  # class-level: what differs between BART and Marian
    embedding_layer_norm = True

    def __post_init__(self):
        super().__post_init__()
        if self.d_model % self.decoder_attention_heads:
            raise ModelLoadError(f"{self.model_type}: d_model {self.d_model} is not a multiple of "
                                 f"decoder_attention_heads {self.decoder_attention_heads}")
        if self.remat:
            raise ModelLoadError(f"{self.model_type}: model.remat is not supported for encoder-decoder models yet")
        if self.encoder_layerdrop or self.decoder_layerdrop:
            raise ModelLoadError(f"{self.model_type}: layerdrop ({self.encoder_layerdrop}, {self.decoder_layerdrop}) "
                                 "is not supported; set encoder_layerdrop and decoder_layerdrop to 0")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0


@dataclass(frozen=True)
class MarianConfig(BartConfig):
    """transformers' MarianConfig fields and defaults."""

    model_type = "marian"

    vocab_size: int = 58101
    decoder_vocab_size: Optional[int] = None
    encoder_ffn_dim: int = 4096
    encoder_attention_heads: int = 16
    decoder_ffn_dim: int = 4096
    decoder_attention_heads: int = 16
    decoder_start_token_id: Optional[int] = 58100
    pad_token_id: Optional[int] = 58100
    eos_token_id: Optional[Any] = 0
    bos_token_id: Optional[int] = None
    forced_eos_token_id: Optional[Any] = 0
    share_encoder_decoder_embeddings: bool = True

    learned_positions = False
    embedding_layer_norm = False

    def __post_init__(self):
        super().__post_init__()
        if self.decoder_vocab_size is None:
            object.__setattr__(self, "decoder_vocab_size", self.vocab_size)
        if not self.share_encoder_decoder_embeddings or self.decoder_vocab_size != self.vocab_size:
            raise ModelLoadError("marian: separate source and target vocabularies (share_encoder_decoder_embeddings "
                                 f"false or decoder_vocab_size {self.decoder_vocab_size} != vocab_size "
                                 f"{self.vocab_size}) are not supported")


# ---------------------------------------------------------------------------------------------
# Positions


@functools.lru_cache(maxsize=8)
def sinusoids(num_positions: int, dim: int) -> np.ndarray:
    """Marian's fixed table (MarianSinusoidalPositionalEmbedding.create_weight): float64 angles,
    sin of the even columns' angles in the first half, cos of the odd ones' in the second."""
    pos = np.arange(num_positions)[:, None]
    angles = pos / np.power(10000, 2 * (np.arange(dim) // 2) / dim)[None, :]
    out = np.empty((num_positions, dim), np.float32)
    half = dim // 2 if dim % 2 == 0 else dim // 2 + 1
    out[:, :half] = np.sin(angles[:, 0::2])
    out[:, half:] = np.cos(angles[:, 1::2])
    return out


# ---------------------------------------------------------------------------------------------
# Modules


class BartAttention(nnx.Module):
    """q/k/v/out projections with biases; logits scaled by head_dim^-0.5."""

    def __init__(self, cfg: BartConfig, num_heads: int, *, rngs: nnx.Rngs):
        D, std = cfg.d_model, cfg.init_std
        self.num_heads = num_heads
        self.q_proj = linear(cfg, D, D, ("embed", "heads"), rngs=rngs, std=std)
        self.k_proj = linear(cfg, D, D, ("embed", "heads"), rngs=rngs, std=std)
        self.v_proj = linear(cfg, D, D, ("embed", "heads"), rngs=rngs, std=std)
        self.out_proj = linear(cfg, D, D, ("heads", "embed"), rngs=rngs, std=std)
        self.dropout_rate = cfg.attention_dropout

    def heads(self, h_BTD):
        return h_BTD.reshape(h_BTD.shape[0], h_BTD.shape[1], self.num_heads, -1)

    def keys_values(self, x_BSD):
        return self.heads(self.k_proj(x_BSD)), self.heads(self.v_proj(x_BSD))

    def __call__(self, x_BTD, bias, *, kv=None, deterministic, rng):
        """`kv`: (keys, values) (B, S, N, H) to attend to (cross-attention or a cache), else x's own."""
        q_BTNH = self.heads(self.q_proj(x_BTD))
        k_BSNH, v_BSNH = kv if kv is not None else self.keys_values(x_BTD)
        out = dot_product_attention(q_BTNH, k_BSNH.astype(q_BTNH.dtype), v_BSNH.astype(q_BTNH.dtype), bias,
                                    dropout_rate=self.dropout_rate, deterministic=deterministic, rng=rng)
        return self.out_proj(out.reshape(x_BTD.shape[0], x_BTD.shape[1], -1))


def feed_forward(layer, x, keys, *, deterministic):
    """fc1 -> activation -> activation dropout -> fc2 of a layer (the caller adds and normalises)."""
    h = layer.activation_dropout(layer.act(layer.fc1(x)), deterministic=deterministic, rng=keys())
    return layer.fc2(h)


def add_feed_forward(layer, cfg: BartConfig, ffn_dim: int, *, rngs: nnx.Rngs):
    """fc1, fc2 and the activation on `layer` itself (HF's `layers.i.fc1`, `layers.i.fc2`)."""
    layer.fc1 = linear(cfg, cfg.d_model, ffn_dim, ("embed", "mlp"), rngs=rngs, std=cfg.init_std)
    layer.fc2 = linear(cfg, ffn_dim, cfg.d_model, ("mlp", "embed"), rngs=rngs, std=cfg.init_std)
    layer.act = activation(cfg.activation_function)
    layer.activation_dropout = Dropout(cfg.activation_dropout)


class BartEncoderLayer(nnx.Module):
    def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs):
        self.self_attn = BartAttention(cfg, cfg.encoder_attention_heads, rngs=rngs)
        self.self_attn_layer_norm = layer_norm(cfg, cfg.d_model, LAYER_NORM_EPS, rngs=rngs)
        add_feed_forward(self, cfg, cfg.encoder_ffn_dim, rngs=rngs)
        self.final_layer_norm = layer_norm(cfg, cfg.d_model, LAYER_NORM_EPS, rngs=rngs)
        self.dropout = Dropout(cfg.dropout)

    def __call__(self, x, bias, keys, *, deterministic):
        drop = lambda h: self.dropout(h, deterministic=deterministic, rng=keys())  # noqa: E731
        x = self.self_attn_layer_norm(x + drop(self.self_attn(x, bias, deterministic=deterministic, rng=keys())))
        return self.final_layer_norm(x + drop(feed_forward(self, x, keys, deterministic=deterministic)))


class BartDecoderLayer(nnx.Module):
    def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs):
        self.self_attn = BartAttention(cfg, cfg.decoder_attention_heads, rngs=rngs)
        self.self_attn_layer_norm = layer_norm(cfg, cfg.d_model, LAYER_NORM_EPS, rngs=rngs)
        self.encoder_attn = BartAttention(cfg, cfg.decoder_attention_heads, rngs=rngs)
        self.encoder_attn_layer_norm = layer_norm(cfg, cfg.d_model, LAYER_NORM_EPS, rngs=rngs)
        add_feed_forward(self, cfg, cfg.decoder_ffn_dim, rngs=rngs)
        self.final_layer_norm = layer_norm(cfg, cfg.d_model, LAYER_NORM_EPS, rngs=rngs)
        self.dropout = Dropout(cfg.dropout)

    def __call__(self, x, self_bias, cross_kv, cross_bias, keys, *, cache_kv=None, index=None, deterministic):
        """-> (x, the new cache keys/values or None)."""
        drop = lambda h: self.dropout(h, deterministic=deterministic, rng=keys())  # noqa: E731
        new_kv = None
        if cache_kv is not None:  # write this step's keys/values, attend over every slot
            new_kv = write_cache(cache_kv, *self.self_attn.keys_values(x), index)
        h = self.self_attn(x, self_bias, kv=new_kv, deterministic=deterministic, rng=keys())
        x = self.self_attn_layer_norm(x + drop(h))
        h = self.encoder_attn(x, cross_bias, kv=cross_kv, deterministic=deterministic, rng=keys())
        x = self.encoder_attn_layer_norm(x + drop(h))
        return self.final_layer_norm(x + drop(feed_forward(self, x, keys, deterministic=deterministic))), new_kv


class Embedded(nnx.Module):
    """What the encoder and the decoder share: `embed_positions` (BART), `layernorm_embedding`
    (BART) and `embed`: token embeddings (the caller's `shared`, times embed_scale) + positions."""

    def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_positions = (embed(cfg, cfg.max_position_embeddings + LEARNED_OFFSET, cfg.d_model,
                                      ("position", "embed"), rngs=rngs, std=cfg.init_std)
                                if cfg.learned_positions else None)
        self.layernorm_embedding = (layer_norm(cfg, cfg.d_model, LAYER_NORM_EPS, rngs=rngs)
                                    if cfg.embedding_layer_norm else None)
        self.dropout = Dropout(cfg.dropout)

    def embed(self, shared: nnx.Embed, ids_BT, positions_T, keys, *, deterministic):
        cfg = self.config
        x = shared(ids_BT) * jnp.asarray(cfg.embed_scale, cfg.activation_dtype)
        if self.embed_positions is not None:
            pos = self.embed_positions(positions_T + LEARNED_OFFSET)
        else:
            pos = jnp.take(jnp.asarray(sinusoids(cfg.max_position_embeddings, cfg.d_model)), positions_T, axis=0)
        x = x + pos.astype(x.dtype)[None]
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout(x, deterministic=deterministic, rng=keys())


class BartEncoder(Embedded):
    def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.layers = nnx.List([BartEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.encoder_layers)])

    def __call__(self, shared, ids_BU, mask_BU, keys, *, deterministic, output_hidden_states=False):
        U = ids_BU.shape[1]
        x = self.embed(shared, ids_BU, jnp.arange(U), keys, deterministic=deterministic)
        bias = padding_bias(mask_BU)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, bias, keys, deterministic=deterministic)
            hidden.append(x)
        return x, (tuple(hidden) if output_hidden_states else None)


class BartDecoder(Embedded):
    def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.layers = nnx.List([BartDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.decoder_layers)])

    def cross_keys_values(self, encoder_BUD) -> list:
        return [layer.encoder_attn.keys_values(encoder_BUD) for layer in self.layers]

    def __call__(self, shared, ids_BT, dec_mask_BT, cross: list, enc_mask_BU, keys, *, cache, deterministic,
                 output_hidden_states=False):
        T = ids_BT.shape[1]
        slot_mask, query_slots, index = decoder_slots(dec_mask_BT, cache, T)
        # positions are slots (0.. whatever the padding), as transformers' decoder counts them
        x = self.embed(shared, ids_BT, query_slots, keys, deterministic=deterministic)
        self_bias, cross_bias = causal_bias(slot_mask, query_slots), padding_bias(enc_mask_BU)
        hidden, new_kv = [x], []
        for i, layer in enumerate(self.layers):
            cache_kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = layer(x, self_bias, cross[i], cross_bias, keys, cache_kv=cache_kv, index=index,
                          deterministic=deterministic)
            new_kv.append(kv)
            hidden.append(x)
        return x, new_kv, slot_mask, (tuple(hidden) if output_hidden_states else None)


def _keys(rngs, deterministic: bool, stream: int) -> KeySplitter:
    key = None if deterministic else as_key(rngs)
    return KeySplitter(None if key is None else jax.random.fold_in(key, stream))


class BartModel(nnx.Module):
    """`shared` + encoder + decoder (`base`): the decoder's `last_hidden_state` and the
    `encoder_last_hidden_state`."""

    hf_architecture = "BartModel"

    def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.shared = embed(cfg, cfg.vocab_size, cfg.d_model, ("vocab", "embed"), rngs=rngs, std=cfg.init_std)
        self.encoder = BartEncoder(cfg, rngs=rngs)
        self.decoder = BartDecoder(cfg, rngs=rngs)

    def encode(self, input_ids, attention_mask=None, *, deterministic: bool = True, rngs=None,
               output_hidden_states: bool = False):
        mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
        return self.encoder(self.shared, input_ids, mask, _keys(rngs, deterministic, 1), deterministic=deterministic,
                            output_hidden_states=output_hidden_states)

    def decode_hidden(self, decoder_input_ids, decoder_attention_mask, encoder_BUD, attention_mask, *, cache=None,
                      deterministic=True, rngs=None, output_hidden_states=False):
        """-> (decoder output (B, T, D), the updated cache or None, hidden states)."""
        if cache is None:
            cross, enc_mask = self.decoder.cross_keys_values(encoder_BUD), attention_mask
        else:
            cross, enc_mask = list(zip(cache.cross_keys, cache.cross_values)), cache.encoder_mask
        dec_mask = (jnp.ones(decoder_input_ids.shape, jnp.int32) if decoder_attention_mask is None
                    else decoder_attention_mask)
        h, new_kv, slot_mask, hidden = self.decoder(
            self.shared, decoder_input_ids, dec_mask, cross, enc_mask, _keys(rngs, deterministic, 2), cache=cache,
            deterministic=deterministic, output_hidden_states=output_hidden_states)
        new_cache = None
        if cache is not None:
            new_cache = cache.replace(keys=tuple(k for k, _ in new_kv), values=tuple(v for _, v in new_kv),
                                      mask=slot_mask, index=cache.index + decoder_input_ids.shape[1])
        return h, new_cache, hidden

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 token_type_ids=None, position_ids=None, *, deterministic: bool = True, rngs=None,
                 output_hidden_states: bool = False) -> Seq2SeqOutput:
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if decoder_input_ids is None:  # as transformers' BartModel: the inputs shifted right
            decoder_input_ids = shift_tokens_right(input_ids, cfg.pad_token_id, cfg.decoder_start_token_id)
        enc, enc_hidden = self.encode(input_ids, attention_mask, deterministic=deterministic, rngs=rngs,
                                      output_hidden_states=output_hidden_states)
        h, _, hidden = self.decode_hidden(decoder_input_ids, decoder_attention_mask, enc, attention_mask,
                                          deterministic=deterministic, rngs=rngs,
                                          output_hidden_states=output_hidden_states)
        return Seq2SeqOutput(last_hidden_state=h, encoder_last_hidden_state=enc, hidden_states=hidden,
                             encoder_hidden_states=enc_hidden)


class BartForConditionalGeneration(Seq2SeqLM, nnx.Module):
    """`model` (BartModel) + LM head (tied to `shared` unless untied) + `final_logits_bias`."""

    hf_architecture = "BartForConditionalGeneration"
    base_cls = BartModel

    def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = self.base_cls(cfg, rngs=rngs)
        self.final_logits_bias = nnx.Param(jnp.zeros((1, cfg.vocab_size), cfg.param_dtype),
                                           logical_axes=(None, "vocab"))
        self.lm_head = None if cfg.tie_word_embeddings else linear(
            cfg, cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, std=cfg.init_std, use_bias=False)

    def encode(self, input_ids, attention_mask=None, *, deterministic: bool = True, rngs=None,
               output_hidden_states: bool = False):
        return self.model.encode(input_ids, attention_mask, deterministic=deterministic, rngs=rngs,
                                 output_hidden_states=output_hidden_states)

    def init_cache(self, encoder_BUD, attention_mask_BU, max_len: int) -> Seq2SeqCache:
        cfg = self.config
        return Seq2SeqCache.empty(encoder_BUD.shape[0], max_len, cfg.decoder_layers, cfg.decoder_attention_heads,
                                  cfg.d_model // cfg.decoder_attention_heads, encoder_BUD.dtype,
                                  self.model.decoder.cross_keys_values(encoder_BUD), attention_mask_BU)

    def lm_logits(self, h):
        logits = self.model.shared.attend(h) if self.lm_head is None else self.lm_head(h)
        return logits.astype(jnp.float32) + self.final_logits_bias[...][0].astype(jnp.float32)

    def decode(self, decoder_input_ids, decoder_attention_mask, encoder_BUD, attention_mask, *, cache=None,
               last_only: bool = False, deterministic: bool = True, rngs=None, output_hidden_states: bool = False):
        h, new_cache, hidden = self.model.decode_hidden(
            decoder_input_ids, decoder_attention_mask, encoder_BUD, attention_mask, cache=cache,
            deterministic=deterministic, rngs=rngs, output_hidden_states=output_hidden_states)
        logits = self.lm_logits(h[:, -1] if last_only else h)
        return Seq2SeqOutput(logits=logits, last_hidden_state=h, hidden_states=hidden, past_key_values=new_cache)


class MarianModel(BartModel):
    hf_architecture = "MarianModel"


class MarianMTModel(BartForConditionalGeneration):
    hf_architecture = "MarianMTModel"
    base_cls = MarianModel


CONFIGS = {"bart": BartConfig, "marian": MarianConfig}
HEADS = {
    "bart": {"base": BartModel, "seq2seq-lm": BartForConditionalGeneration},
    "marian": {"base": MarianModel, "seq2seq-lm": MarianMTModel},
}
