"""GPT-2 in Flax NNX, laid out like transformers' `modeling_gpt2` so checkpoints map one to one.

Pre-LN decoder blocks `h.i` = ln_1 -> attn (c_attn fused q|k|v, c_proj) -> ln_2 -> mlp (c_fc,
c_proj), then `ln_f`. Differences from the HF layout, all undone by the key table (params.py):
`c_attn` is stored as (embed, 3, embed) / (3, embed) instead of HF's (embed, 3 * embed), so that
sharding the `heads` axis splits q, k and v by heads; HF's Conv1D weights are (in, out) like our
kernels, so they are not transposed.

Attention is causal and combined with the padding mask (`attention_mask` (B, T)) and, for packed
rows, with `segment_ids` (B, T): 0 for padding, 1, 2, ... for the examples packed into a row; a
token attends only to earlier tokens of its own example, and positions restart at 0 in each one.

Positions, as transformers computes them: `position_ids` when given; else 0..T-1 (offset by the
cache index when decoding), whatever the padding (GPT2Model.forward ignores attention_mask for
positions; generation passes cumsum(attention_mask) - 1 itself, see jaxtune.models.generate).

Shapes in names: B batch, T new tokens, S keys (cache slots), D embed, N heads, H head dim,
F inner, V vocab, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import JaxtuneError, ModelLoadError
from jaxtune.models.activations import activation
from jaxtune.models.config import ConfigBase
from jaxtune.models.dropout import Dropout, KeySplitter, as_key
from jaxtune.models import decoder
from jaxtune.models.decoder import segment_positions
from jaxtune.models.kernels import dot_product_attention
from jaxtune.models.layers import call_layer, embed, layer_norm, linear, normal
from jaxtune.models.outputs import ModelOutput


@dataclass(frozen=True)
class GPT2Config(ConfigBase):
    """transformers' GPT2Config fields and defaults (DoubleHeads `summary_*` fields stay in extra)."""

    model_type = "gpt2"

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False  # numerics only; softmax always runs in float32 here
    add_cross_attention: bool = False
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[Any] = 50256  # an int or a tuple of ints
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = True

    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "n_positions"}
    activation_fields = ("activation_function",)

    def __post_init__(self):
        if self.add_cross_attention:
            raise ModelLoadError("gpt2: add_cross_attention=true (an encoder-decoder GPT-2) is not supported")
        super().__post_init__()

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),)


# ---------------------------------------------------------------------------------------------
# KV cache


@flax.struct.dataclass
class KVCache:
    """A preallocated key/value cache: one (B, S, N, H) array per layer for keys and for values.

    `mask` (B, S) int32 marks the slots holding real tokens (prompt padding stays 0); `index`
    (int32 scalar) is the number of slots written so far, the same for every row (prompts are
    left-padded to one length). Functional: every call returns a new cache.
    """

    keys: tuple
    values: tuple
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: GPT2Config, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or config.activation_dtype
        shape = (batch, max_len, config.n_head, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer))
        return cls(keys=zeros, values=zeros, mask=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


# ---------------------------------------------------------------------------------------------
# Masks and positions


def mask_to_bias(allowed_BTS: jax.Array) -> jax.Array:
    """Boolean (B, T, S) -> additive (B, 1, T, S) float32 bias (rows with no key stay finite)."""
    return jnp.where(allowed_BTS[:, None], 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def causal_allowed(attention_mask_BT, segment_ids_BT) -> jax.Array:
    """(B, T, T): key s <= query t, key not padding, same segment."""
    T = attention_mask_BT.shape[1]
    allowed = jnp.tril(jnp.ones((T, T), bool))[None] & attention_mask_BT[:, None, :].astype(bool)
    if segment_ids_BT is not None:
        allowed = allowed & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    return allowed


# ---------------------------------------------------------------------------------------------
# Modules


class FusedQKV(nnx.Module):
    """HF's `c_attn` Conv1D (D -> 3D), kept as kernel (D, 3, D) and bias (3, D)."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        D = cfg.n_embd
        self.kernel = nnx.Param(normal(cfg.initializer_range)(rngs.params(), (D, 3, D), cfg.param_dtype),
                                logical_axes=("embed", None, "heads"))
        self.bias = nnx.Param(jnp.zeros((3, D), cfg.param_dtype), logical_axes=(None, "heads"))
        self.dtype = cfg.activation_dtype

    def __call__(self, x_BTD):
        kernel, bias = self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype)
        qkv_BTKD = jnp.einsum("btd,dke->btke", x_BTD.astype(self.dtype), kernel) + bias
        return qkv_BTKD[:, :, 0], qkv_BTKD[:, :, 1], qkv_BTKD[:, :, 2]


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        D = cfg.n_embd
        self.num_heads, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = FusedQKV(cfg, rngs=rngs)
        # HF scales c_proj's init by 1/sqrt(2 L) (residual paths); only fresh models see it.
        std = cfg.initializer_range / (2 * cfg.n_layer) ** 0.5
        self.c_proj = linear(cfg, D, D, ("heads", "embed"), rngs=rngs, std=std)
        self.attn_dropout_rate = cfg.attn_pdrop
        self.resid_dropout = Dropout(cfg.resid_pdrop)
        scale = self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale

    def __call__(self, x_BTD, bias, kv, index, *, deterministic, keys):
        B, T, _ = x_BTD.shape
        q, k, v = self.c_attn(x_BTD)
        shape = (B, T, self.num_heads, self.head_dim)
        q_BTNH, k_BTNH, v_BTNH = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        new_kv = None
        if kv is not None:  # write the new keys/values at the cache index, attend over all slots
            k_BSNH = jax.lax.dynamic_update_slice(kv[0], k_BTNH.astype(kv[0].dtype), (0, index, 0, 0))
            v_BSNH = jax.lax.dynamic_update_slice(kv[1], v_BTNH.astype(kv[1].dtype), (0, index, 0, 0))
            new_kv = (k_BSNH, v_BSNH)
            k_BTNH, v_BTNH = k_BSNH.astype(q_BTNH.dtype), v_BSNH.astype(q_BTNH.dtype)
        out_BTNH = dot_product_attention(
            q_BTNH, k_BTNH, v_BTNH, bias, dropout_rate=self.attn_dropout_rate,
            deterministic=deterministic, rng=keys(), scale=self.scale,
        )
        h_BTD = self.c_proj(out_BTNH.reshape(B, T, -1))
        return self.resid_dropout(h_BTD, deterministic=deterministic, rng=keys()), new_kv


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        D, F = cfg.n_embd, cfg.inner_dim
        self.c_fc = linear(cfg, D, F, ("embed", "mlp"), rngs=rngs, std=cfg.initializer_range)
        self.c_proj = linear(cfg, F, D, ("mlp", "embed"), rngs=rngs,
                             std=cfg.initializer_range / (2 * cfg.n_layer) ** 0.5)
        self.act = activation(cfg.activation_function)
        self.dropout = Dropout(cfg.resid_pdrop)

    def __call__(self, x_BTD, *, deterministic, rng):
        return self.dropout(self.c_proj(self.act(self.c_fc(x_BTD))), deterministic=deterministic, rng=rng)


class GPT2Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        self.ln_1 = layer_norm(cfg, cfg.n_embd, cfg.layer_norm_epsilon, rngs=rngs)
        self.attn = GPT2Attention(cfg, layer_idx, rngs=rngs)
        self.ln_2 = layer_norm(cfg, cfg.n_embd, cfg.layer_norm_epsilon, rngs=rngs)
        self.mlp = GPT2MLP(cfg, rngs=rngs)

    def __call__(self, x_BTD, bias, rng, kv=None, index=None, *, deterministic):
        keys = KeySplitter(rng)
        h_BTD, new_kv = self.attn(self.ln_1(x_BTD), bias, kv, index, deterministic=deterministic, keys=keys)
        x_BTD = x_BTD + h_BTD
        x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD), deterministic=deterministic, rng=keys())
        return x_BTD, new_kv


class GPT2Model(nnx.Module):
    """The bare decoder: `last_hidden_state` (after ln_f); `past_key_values` when given a cache.

    `token_type_ids`, as in transformers, are looked up in `wte` and added (rarely used).
    """

    hf_architecture = "GPT2Model"
    embed_tokens_attr = "wte"  # the word embedding a tied LM head decodes with

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        std = cfg.initializer_range
        self.wte = embed(cfg, cfg.vocab_size, cfg.n_embd, ("vocab", "embed"), rngs=rngs, std=std)
        self.wpe = embed(cfg, cfg.n_positions, cfg.n_embd, ("position", "embed"), rngs=rngs, std=std)
        self.drop = Dropout(cfg.embd_pdrop)
        self.h = nnx.List([GPT2Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
        self.ln_f = layer_norm(cfg, cfg.n_embd, cfg.layer_norm_epsilon, rngs=rngs)
        self.remat = cfg.remat

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        *,
        cache: Optional[KVCache] = None,
        deterministic: bool = True,
        rngs=None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        keys = KeySplitter(None if deterministic else as_key(rngs))
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32) if segment_ids is None else (segment_ids != 0)
        attention_mask = attention_mask.astype(jnp.int32)
        if cache is None:
            if position_ids is None:
                position_ids = (segment_positions(segment_ids) if segment_ids is not None
                                else jnp.broadcast_to(jnp.arange(T), (B, T)))
            bias = mask_to_bias(causal_allowed(attention_mask, segment_ids))
            index = None
        else:
            if segment_ids is not None:
                raise JaxtuneError("GPT2Model: segment_ids (packed rows) cannot be used with a KV cache")
            index = cache.index
            slot_mask_BS = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, index))
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(T) + index, (B, T))
            slots_S = jnp.arange(cache.max_len)
            allowed = (slots_S[None, None, :] <= (index + jnp.arange(T))[None, :, None]) & (
                slot_mask_BS[:, None, :].astype(bool))
            bias = mask_to_bias(allowed)

        x_BTD = self.wte(input_ids) + self.wpe(position_ids)
        if token_type_ids is not None:
            x_BTD = x_BTD + self.wte(token_type_ids)
        x_BTD = self.drop(x_BTD, deterministic=deterministic, rng=keys())

        hidden, new_k, new_v = [x_BTD], [], []
        for i, block in enumerate(self.h):
            if cache is None:
                x_BTD, _ = call_layer(self.remat, block, x_BTD, bias, keys(), deterministic=deterministic)
            else:
                x_BTD, (k, v) = block(x_BTD, bias, keys(), (cache.keys[i], cache.values[i]), index,
                                      deterministic=deterministic)
                new_k.append(k)
                new_v.append(v)
            hidden.append(x_BTD)
        x_BTD = self.ln_f(x_BTD)
        hidden[-1] = x_BTD  # as transformers: the last hidden state is the one after ln_f
        new_cache = None
        if cache is not None:
            new_cache = KVCache(keys=tuple(new_k), values=tuple(new_v), mask=slot_mask_BS, index=index + T)
        return ModelOutput(last_hidden_state=x_BTD, past_key_values=new_cache,
                           hidden_states=tuple(hidden) if output_hidden_states else None)


class GPT2HeadBase:
    """GPT-2's heads: the base model under `transformer`, the cache `KVCache`."""

    base_prefix = "transformer"
    base_cls = GPT2Model
    cache_cls = KVCache


class GPT2LMHeadModel(GPT2HeadBase, decoder.DecoderForCausalLM):
    hf_architecture = "GPT2LMHeadModel"


class GPT2ForSequenceClassification(GPT2HeadBase, decoder.DecoderForSequenceClassification):
    hf_architecture = "GPT2ForSequenceClassification"


# task -> head class: the family record's table (jaxtune.models.gpt2.FAMILY)
HEADS = {"base": GPT2Model, "causal-lm": GPT2LMHeadModel, "sequence-classification": GPT2ForSequenceClassification}
