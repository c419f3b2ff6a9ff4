"""Llama-architecture decoders in Flax NNX: HF `model_type`s llama, mistral, qwen2 and qwen3.

One implementation, laid out like transformers' `modeling_llama` (`model.embed_tokens`,
`model.layers.i.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
mlp.{gate,up,down}_proj}`, `model.norm`, `lm_head`) so checkpoints map one to one; the four
model types differ only in their configs (which biases exist, Qwen3's per-head q/k RMSNorm,
which layers use a sliding window). Each model type has its own Config and head classes, so an
export names the right `model_type` and `architectures`.

A block: x + o_proj(attention(rope(q), rope(k), v)) on RMSNorm(x), then x + down(silu(gate) * up)
on RMSNorm(x); RMSNorm runs in float32 like transformers' and casts back.

Attention is causal and combined with the padding mask (`attention_mask` (B, T)) and, for packed
rows, with `segment_ids` (B, T): 0 for padding, 1, 2, ... for the examples of a row; a token
attends only to earlier tokens of its own example, and positions restart at 0 in each one.
Positions, as transformers: `position_ids` when given, else 0..T-1 (offset by the cache index
when decoding) whatever the padding (generation passes cumsum(mask) - 1 itself).

Grouped-query attention (`num_key_value_heads` K < heads N, G = N / K): the queries of the G heads
sharing a kv head are folded into the query axis, (B, T, K, G, H) -> (B, G*T, K, H), so
`kernels.dot_product_attention` sees K heads of G*T query rows against the K kv heads as they
are: bigger matmuls than repeating k/v G times, and nothing of k/v is copied (see
`grouped_attention`). The KV cache holds K heads.

Sliding window (`window`: Mistral's `sliding_window` on every layer; Qwen2/Qwen3 only when
`use_sliding_window`, on the layers `layer_types` marks `sliding_attention`, which by default are
the layers i >= `max_window_layers`, as transformers 5 resolves them): query slot t sees key slots
s with t - window < s <= t, counted in slots of the row like transformers' mask (the same as
positions for a row's contiguous tokens, packed examples included).

RoPE: `rope_parameters` (transformers 5's field; older configs' `rope_theta` and `rope_scaling`
are read into it) of type `default`, `linear` or `llama3`, with inv_freq computed as
`transformers.modeling_rope_utils` does; any other type is a one-line ModelLoadError.

Sharding (logical axes, mapped by `jaxtune.parallel`'s rules): q_proj (embed, heads), k/v_proj
(embed, kv), o_proj (heads, embed), gate/up (embed, mlp), down (mlp, embed), embed_tokens
(vocab, embed), lm_head (embed, vocab), score (embed, classes), norms (embed) and q/k norms
unnamed. `heads` and `kv` both map to `tensor`. When the tensor axis does not divide
num_key_value_heads * head_dim (e.g. 1 kv head of 6 over tensor=4), the generic rule applies:
k_proj / v_proj (and their biases) are replicated over `tensor` and one warning names them; the
numbers are unchanged (tests/models/test_llama_parallel.py). When it divides the width but not
the head count (3 kv heads over tensor=2), the width is split mid-head: correct, and XLA adds the
communication that needs.

Shapes in names: B batch, T new tokens, S keys (cache slots), D hidden, N heads, K kv heads,
G = N / K, H head dim, F intermediate, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import JaxtuneError, ModelLoadError
from jaxtune.models.activations import activation
from jaxtune.models.config import ConfigBase
from jaxtune.models.dropout import KeySplitter, as_key
from jaxtune.models import decoder
from jaxtune.models.decoder import segment_positions
from jaxtune.models.kernels import dot_product_attention
from jaxtune.models.layers import call_layer, embed, linear
from jaxtune.models.outputs import ModelOutput

ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


# ---------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class DecoderConfig(ConfigBase):
    """The fields the four configs share (transformers' LlamaConfig defaults; subclasses redeclare
    theirs). `rope_parameters` is kept as sorted (key, value) pairs (a config must be hashable)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Any] = 2  # an int or a tuple of ints
    tie_word_embeddings: bool = False
    rope_parameters: Optional[Any] = None
    attention_dropout: float = 0.0

    def __post_init__(self):
        # No hidden % heads check (ConfigBase's): head_dim may be set on its own (Qwen3).
        for name in self.activation_fields:
            activation(getattr(self, name))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(f"{self.model_type}: num_attention_heads {self.num_attention_heads} is not a "
                                 f"multiple of num_key_value_heads {self.num_key_value_heads}")
        object.__setattr__(self, "rope_parameters", self._standard_rope())

    def _standard_rope(self) -> tuple:
        """transformers' `standardize_rope_params`, checked: sorted (key, value) pairs."""
        rope = dict(self.rope_parameters or {})
        if any(isinstance(v, dict) for v in rope.values()):
            raise ModelLoadError(f"{self.model_type}: per-layer-type rope_parameters are not supported")
        rope.setdefault("rope_type", rope.get("type", "default"))
        rope.setdefault("rope_theta", 10000.0)
        kind = rope["rope_type"]
        if kind not in ROPE_TYPES:
            raise ModelLoadError(f"{self.model_type}: rope type '{kind}' is not supported; supported: "
                                 f"{', '.join(ROPE_TYPES)}")
        if kind == "llama3":
            rope.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        missing = [k for k in _ROPE_REQUIRED.get(kind, ()) if rope.get(k) is None]
        if missing:
            raise ModelLoadError(f"{self.model_type}: rope type '{kind}' needs {', '.join(missing)} in rope_parameters")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelLoadError(f"{self.model_type}: partial_rotary_factor "
                                 f"{rope['partial_rotary_factor']} is not supported (only 1.0)")
        return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()))

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "DecoderConfig":
        """As transformers 5 reads a config: `rope_scaling` (older files) wins over
        `rope_parameters`, and a top-level `rope_theta` fills in the theta."""
        hf = dict(hf)
        scaling, theta = hf.pop("rope_scaling", None), hf.pop("rope_theta", None)
        rope = dict(scaling or hf.get("rope_parameters") or {})
        if theta is not None:
            rope.setdefault("rope_theta", theta)
        hf["rope_parameters"] = rope or None
        return super().from_hf(hf, **overrides)

    def to_hf(self) -> dict:
        out = super().to_hf()
        out["rope_parameters"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.rope_parameters}
        return out

    @property
    def rope(self) -> dict:
        return dict(self.rope_parameters)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),)

    # What the layers need, per model type (overridden below).
    qkv_bias = property(lambda self: False)
    o_bias = property(lambda self: False)
    mlp_has_bias = property(lambda self: False)
    qk_norm = property(lambda self: False)

    def window(self, layer: int) -> Optional[int]:
        """The sliding window of layer `layer` (None: full causal attention)."""
        return None


@dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    """transformers' LlamaConfig fields and defaults."""

    model_type = "llama"

    pretraining_tp: Optional[int] = 1  # numerics only in old transformers; unused
    attention_bias: bool = False
    mlp_bias: bool = False
    head_dim: Optional[int] = None

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        super().__post_init__()

    qkv_bias = property(lambda self: self.attention_bias)
    o_bias = property(lambda self: self.attention_bias)
    mlp_has_bias = property(lambda self: self.mlp_bias)


@dataclass(frozen=True)
class MistralConfig(DecoderConfig):
    """transformers' MistralConfig fields and defaults."""

    model_type = "mistral"

    intermediate_size: int = 14336
    num_key_value_heads: Optional[int] = 8
    max_position_embeddings: int = 4096 * 32
    head_dim: Optional[int] = None
    sliding_window: Optional[int] = 4096

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        super().__post_init__()

    def window(self, layer: int) -> Optional[int]:
        return self.sliding_window


@dataclass(frozen=True)
class Qwen2Config(DecoderConfig):
    """transformers' Qwen2Config fields and defaults (head_dim is hidden / heads)."""

    model_type = "qwen2"

    vocab_size: int = 151936
    intermediate_size: int = 22016
    num_key_value_heads: Optional[int] = 32
    max_position_embeddings: int = 32768
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Any] = None
    use_sliding_window: bool = False
    sliding_window: Optional[int] = 4096
    max_window_layers: int = 28
    layer_types: Optional[tuple] = None

    def __post_init__(self):
        # As transformers 5: no window unless use_sliding_window; layer_types resolved and kept.
        if not self.use_sliding_window:
            object.__setattr__(self, "sliding_window", None)
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", tuple(
                "sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                else "full_attention" for i in range(self.num_hidden_layers)))
        super().__post_init__()

    qkv_bias = property(lambda self: True)

    def window(self, layer: int) -> Optional[int]:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


@dataclass(frozen=True)
class Qwen3Config(Qwen2Config):
    """transformers' Qwen3Config fields and defaults (Qwen2's plus head_dim, attention_bias)."""

    model_type = "qwen3"

    head_dim: int = 128
    attention_bias: bool = False

    qkv_bias = property(lambda self: self.attention_bias)
    o_bias = property(lambda self: self.attention_bias)
    qk_norm = property(lambda self: True)


# ---------------------------------------------------------------------------------------------
# RoPE


def inv_freq(rope_parameters: tuple, head_dim: int) -> np.ndarray:
    """(H/2,) float32 inverse frequencies, as transformers' `modeling_rope_utils` computes them."""
    rope = dict(rope_parameters)
    f32 = np.float32
    freq = f32(1.0) / (f32(rope["rope_theta"]) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)))
    kind = rope["rope_type"]
    if kind == "linear":
        freq = freq / f32(rope["factor"])
    elif kind == "llama3":
        factor, low, high = (f32(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old = f32(rope["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = f32(2 * math.pi) / freq
        scaled = np.where(wavelen > low_wavelen, freq / factor, freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        freq = np.where(medium, smoothed, scaled)
    return freq.astype(f32)


def rope_cos_sin(position_ids_BT, rope_parameters: tuple, head_dim: int, dtype):
    """cos, sin (B, T, H) of the rotary embedding, computed in float32 and cast to `dtype`."""
    freqs_BTh = position_ids_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(rope_parameters, head_dim))
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return jnp.cos(emb_BTH).astype(dtype), jnp.sin(emb_BTH).astype(dtype)


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1) of x's two halves."""
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    return x_BTNH * cos_BTH[:, :, None] + rotated * sin_BTH[:, :, None]


# ---------------------------------------------------------------------------------------------
# KV cache, masks, positions


@flax.struct.dataclass
class KVCache:
    """A preallocated key/value cache: one (B, S, K, H) array per layer for keys and for values.

    `mask` (B, S) int32 marks the slots holding real tokens; `index` (int32 scalar) is the number
    of slots written, the same for every row (prompts are left-padded to one length).
    """

    keys: tuple
    values: tuple
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: DecoderConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or config.activation_dtype
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(keys=zeros, values=zeros, mask=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


def attention_bias(slot_mask_BS, query_slots_T, segment_ids_BT=None, window: Optional[int] = None):
    """Additive (B, 1, T, S) float32 bias: key slot s <= query slot t (and t - s < window), key
    not padding, same segment; masked entries are float32's min (rows with no key stay finite)."""
    slots_S = jnp.arange(slot_mask_BS.shape[1])
    allowed_TS = slots_S[None, :] <= query_slots_T[:, None]
    if window is not None:
        allowed_TS = allowed_TS & (slots_S[None, :] > query_slots_T[:, None] - window)
    allowed_BTS = allowed_TS[None] & slot_mask_BS[:, None, :].astype(bool)
    if segment_ids_BT is not None:
        allowed_BTS = allowed_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    return jnp.where(allowed_BTS[:, None], 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def grouped_attention(q_BTNH, k_BSKH, v_BSKH, bias_B1TS, *, dropout_rate, deterministic, rng):
    """Attention with K kv heads for N = K * G query heads (head n reads kv head n // G).

    The G query heads of a kv head become G blocks of query rows: (B, T, K, G, H) -> (B, G*T, K, H)
    and the bias is repeated over the blocks, so the kernel attends K heads against k/v as they are.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    if G == 1:
        return dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias_B1TS, dropout_rate=dropout_rate,
                                     deterministic=deterministic, rng=rng)
    q_BQKH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 3, 1, 2, 4).reshape(B, G * T, K, H)
    S = bias_B1TS.shape[-1]
    bias_B1QS = jnp.broadcast_to(bias_B1TS[:, :, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    out_BQKH = dot_product_attention(q_BQKH, k_BSKH, v_BSKH, bias_B1QS, dropout_rate=dropout_rate,
                                     deterministic=deterministic, rng=rng)
    return out_BQKH.reshape(B, G, T, K, H).transpose(0, 2, 3, 1, 4).reshape(B, T, N, H)


# ---------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nnx.Module):
    """transformers' LlamaRMSNorm: x / rms(x) in float32, cast back, times `scale` (HF `weight`)."""

    def __init__(self, cfg: DecoderConfig, dim: int, *, axis: Optional[str] = "embed"):
        self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype), logical_axes=(axis,))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.initializer_range
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.q_proj = linear(cfg, D, N * H, ("embed", "heads"), rngs=rngs, std=std, use_bias=cfg.qkv_bias)
        self.k_proj = linear(cfg, D, K * H, ("embed", "kv"), rngs=rngs, std=std, use_bias=cfg.qkv_bias)
        self.v_proj = linear(cfg, D, K * H, ("embed", "kv"), rngs=rngs, std=std, use_bias=cfg.qkv_bias)
        self.o_proj = linear(cfg, N * H, D, ("heads", "embed"), rngs=rngs, std=std, use_bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg, H, axis=None) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg, H, axis=None) if cfg.qk_norm else None
        self.dropout_rate = cfg.attention_dropout

    def __call__(self, x_BTD, cos_BTH, sin_BTH, bias, kv, index, *, deterministic, rng):
        B, T, _ = x_BTD.shape
        q_BTNH = self.q_proj(x_BTD).reshape(B, T, self.num_heads, self.head_dim)
        k_BTKH = self.k_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
        v_BTKH = self.v_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        q_BTNH, k_BTKH = apply_rope(q_BTNH, cos_BTH, sin_BTH), apply_rope(k_BTKH, cos_BTH, sin_BTH)
        new_kv = None
        if kv is not None:  # write the new keys/values at the cache index, attend over all slots
            k_BSKH = jax.lax.dynamic_update_slice(kv[0], k_BTKH.astype(kv[0].dtype), (0, index, 0, 0))
            v_BSKH = jax.lax.dynamic_update_slice(kv[1], v_BTKH.astype(kv[1].dtype), (0, index, 0, 0))
            new_kv = (k_BSKH, v_BSKH)
            k_BTKH, v_BTKH = k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype)
        out_BTNH = grouped_attention(q_BTNH, k_BTKH, v_BTKH, bias, dropout_rate=self.dropout_rate,
                                     deterministic=deterministic, rng=rng)
        return self.o_proj(out_BTNH.reshape(B, T, -1)), new_kv


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        D, F, std, bias = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range, cfg.mlp_has_bias
        self.gate_proj = linear(cfg, D, F, ("embed", "mlp"), rngs=rngs, std=std, use_bias=bias)
        self.up_proj = linear(cfg, D, F, ("embed", "mlp"), rngs=rngs, std=std, use_bias=bias)
        self.down_proj = linear(cfg, F, D, ("mlp", "embed"), rngs=rngs, std=std, use_bias=bias)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x_BTD):
        return self.down_proj(self.act(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg, cfg.hidden_size)
        self.self_attn = LlamaAttention(cfg, layer_idx, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg, cfg.hidden_size)
        self.mlp = LlamaMLP(cfg, rngs=rngs)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, bias, rng, kv=None, index=None, *, deterministic):
        h_BTD, new_kv = self.self_attn(self.input_layernorm(x_BTD), cos_BTH, sin_BTH, bias, kv, index,
                                       deterministic=deterministic, rng=rng)
        x_BTD = x_BTD + h_BTD
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD)), new_kv


class DecoderModel(nnx.Module):
    """The bare decoder: `last_hidden_state` (after `norm`); `past_key_values` when given a cache.

    `token_type_ids` are accepted (the task heads' common signature) and ignored, as transformers'
    Llama ignores them.
    """

    embed_tokens_attr = "embed_tokens"  # the word embedding a tied LM head decodes with

    hf_architecture = "LlamaModel"

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = embed(cfg, cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), rngs=rngs,
                                  std=cfg.initializer_range)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg, cfg.hidden_size)
        self.windows = tuple(cfg.window(i) for i in range(cfg.num_hidden_layers))
        self.remat = cfg.remat

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 segment_ids=None, *, cache: Optional[KVCache] = None, deterministic: bool = True, rngs=None,
                 output_hidden_states: bool = False) -> ModelOutput:
        cfg = self.config
        keys = KeySplitter(None if deterministic else as_key(rngs))
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32) if segment_ids is None else (segment_ids != 0)
        attention_mask = attention_mask.astype(jnp.int32)
        if cache is None:
            index, slot_mask_BS = None, attention_mask
            query_slots_T = jnp.arange(T)
            if position_ids is None:
                position_ids = (segment_positions(segment_ids) if segment_ids is not None
                                else jnp.broadcast_to(jnp.arange(T), (B, T)))
        else:
            if segment_ids is not None:
                raise JaxtuneError(f"{type(self).__name__}: segment_ids (packed rows) cannot be used with a KV cache")
            index = cache.index
            slot_mask_BS = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, index))
            query_slots_T = index + jnp.arange(T)
            if position_ids is None:
                position_ids = jnp.broadcast_to(query_slots_T, (B, T))
        biases = {w: attention_bias(slot_mask_BS, query_slots_T, segment_ids, w) for w in set(self.windows)}

        x_BTD = self.embed_tokens(input_ids)
        cos_BTH, sin_BTH = rope_cos_sin(position_ids, cfg.rope_parameters, cfg.head_dim, x_BTD.dtype)
        hidden, new_k, new_v = [x_BTD], [], []
        for i, layer in enumerate(self.layers):
            bias = biases[self.windows[i]]
            if cache is None:
                x_BTD, _ = call_layer(self.remat, layer, x_BTD, cos_BTH, sin_BTH, bias, keys(),
                                      deterministic=deterministic)
            else:
                x_BTD, (k, v) = layer(x_BTD, cos_BTH, sin_BTH, bias, keys(), (cache.keys[i], cache.values[i]),
                                      index, deterministic=deterministic)
                new_k.append(k)
                new_v.append(v)
            hidden.append(x_BTD)
        x_BTD = self.norm(x_BTD)
        hidden[-1] = x_BTD  # as transformers: the last hidden state is the one after the norm
        new_cache = None
        if cache is not None:
            new_cache = KVCache(keys=tuple(new_k), values=tuple(new_v), mask=slot_mask_BS, index=index + T)
        return ModelOutput(last_hidden_state=x_BTD, past_key_values=new_cache,
                           hidden_states=tuple(hidden) if output_hidden_states else None)


class DecoderHeadBase:
    """The Llama family's heads: the base model under `model`, the cache `KVCache`."""

    base_prefix = "model"
    base_cls = DecoderModel
    cache_cls = KVCache


class DecoderForCausalLM(DecoderHeadBase, decoder.DecoderForCausalLM):
    hf_architecture = "LlamaForCausalLM"


class DecoderForSequenceClassification(DecoderHeadBase, decoder.DecoderForSequenceClassification):
    hf_architecture = "LlamaForSequenceClassification"


# The head classes of each model type: the same modules, named as transformers names them.


class LlamaModel(DecoderModel):
    hf_architecture = "LlamaModel"


class LlamaForCausalLM(DecoderForCausalLM):
    hf_architecture = "LlamaForCausalLM"


class LlamaForSequenceClassification(DecoderForSequenceClassification):
    hf_architecture = "LlamaForSequenceClassification"


class MistralModel(DecoderModel):
    hf_architecture = "MistralModel"


class MistralForCausalLM(DecoderForCausalLM):
    hf_architecture = "MistralForCausalLM"


class MistralForSequenceClassification(DecoderForSequenceClassification):
    hf_architecture = "MistralForSequenceClassification"


class Qwen2Model(DecoderModel):
    hf_architecture = "Qwen2Model"


class Qwen2ForCausalLM(DecoderForCausalLM):
    hf_architecture = "Qwen2ForCausalLM"


class Qwen2ForSequenceClassification(DecoderForSequenceClassification):
    hf_architecture = "Qwen2ForSequenceClassification"


class Qwen3Model(DecoderModel):
    hf_architecture = "Qwen3Model"


class Qwen3ForCausalLM(DecoderForCausalLM):
    hf_architecture = "Qwen3ForCausalLM"


class Qwen3ForSequenceClassification(DecoderForSequenceClassification):
    hf_architecture = "Qwen3ForSequenceClassification"


CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}

# model_type -> task -> head class: the family records' tables (jaxtune.models.llama.FAMILIES)
HEADS = {
    "llama": {"base": LlamaModel, "causal-lm": LlamaForCausalLM,
              "sequence-classification": LlamaForSequenceClassification},
    "mistral": {"base": MistralModel, "causal-lm": MistralForCausalLM,
                "sequence-classification": MistralForSequenceClassification},
    "qwen2": {"base": Qwen2Model, "causal-lm": Qwen2ForCausalLM,
              "sequence-classification": Qwen2ForSequenceClassification},
    "qwen3": {"base": Qwen3Model, "causal-lm": Qwen3ForCausalLM,
              "sequence-classification": Qwen3ForSequenceClassification},
}
