"""What the encoder-decoder families (T5 / mT5, BART / Marian) share: their output record, the
decoder's KV cache (self-attention slots plus the cross-attention keys/values computed once from
the encoder output), the attention biases, transformers' `shift_tokens_right`, and the
`Seq2SeqLM` head interface generation relies on (`jaxtune.models.seq2seq_generate`).

A seq2seq-LM head has:

- `encode(input_ids, attention_mask, *, deterministic, rngs) -> (B, T, D)` encoder output;
- `init_cache(encoder_hidden_BTD, attention_mask_BT, max_len) -> Seq2SeqCache`: empty decoder
  slots and every decoder layer's cross-attention keys/values (computed here, once);
- `decode(decoder_input_ids, decoder_attention_mask, encoder_hidden, attention_mask, *, cache,
  last_only, deterministic, rngs) -> Seq2SeqOutput` with `.logits` (B, T', V) (or (B, V) when
  `last_only`) and, with a cache, the updated one in `.past_key_values`;
- `__call__(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels=...)`:
  both at once, as transformers' `...ForConditionalGeneration`; without `decoder_input_ids` they
  are `labels` shifted right (`shift_tokens_right`).

Shapes in names: B batch, T target (decoder) tokens, S cache slots, U source (encoder) tokens,
N heads, H head dim, D model width, V vocab.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from jaxtune.errors import JaxtuneError

IGNORE = -100  # label value that carries no loss (transformers' convention)
NEG = jnp.finfo(jnp.float32).min


@flax.struct.dataclass
class Seq2SeqOutput:
    """What the encoder-decoder models return; unused fields stay None (a pytree for jit)."""

    logits: Optional[jax.Array] = None
    last_hidden_state: Optional[jax.Array] = None  # the decoder's (or, for an encoder model, the encoder's)
    encoder_last_hidden_state: Optional[jax.Array] = None
    hidden_states: Optional[tuple] = None
    encoder_hidden_states: Optional[tuple] = None
    past_key_values: Any = None


@flax.struct.dataclass
class Seq2SeqCache:
    """The decoder's cache: per layer self-attention keys/values (B, S, N, H), written at `index`
    (the same for every row: decoding starts from one start token per row); the slots written so
    far in `mask` (B, S); per layer cross-attention keys/values (B, U, N, H) of the encoder output
    and the encoder's padding mask (B, U)."""

    keys: tuple
    values: tuple
    mask: jax.Array
    index: jax.Array
    cross_keys: tuple
    cross_values: tuple
    encoder_mask: jax.Array

    @classmethod
    def empty(cls, batch: int, max_len: int, num_layers: int, heads: int, head_dim: int, dtype,
              cross: list, encoder_mask) -> "Seq2SeqCache":
        """Zero self-attention slots; `cross` is a list of (keys, values) per decoder layer."""
        zeros = tuple(jnp.zeros((batch, max_len, heads, head_dim), dtype) for _ in range(num_layers))
        return cls(keys=zeros, values=zeros, mask=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32), cross_keys=tuple(k for k, _ in cross),
                   cross_values=tuple(v for _, v in cross), encoder_mask=encoder_mask.astype(jnp.int32))

    def reorder(self, rows_B: jax.Array) -> "Seq2SeqCache":
        """The cache of rows `rows_B` (beam search: each new beam continues the beam it came from)."""
        take = lambda x: jnp.take(x, rows_B, axis=0)  # noqa: E731
        return self.replace(keys=tuple(map(take, self.keys)), values=tuple(map(take, self.values)),
                            mask=take(self.mask))


def shift_tokens_right(labels_BT, pad_token_id: Optional[int], decoder_start_token_id: Optional[int]):
    """transformers' `shift_tokens_right` / T5's `_shift_right`: the decoder's inputs for `labels`:
    the start token, then the labels but the last; -100 becomes the pad id.

    >>> shift_tokens_right(jnp.array([[5, 6, 1, -100]]), 0, 0).tolist()
    [[0, 5, 6, 1]]
    """
    if decoder_start_token_id is None or pad_token_id is None:
        raise JaxtuneError("decoder inputs from labels need the config's decoder_start_token_id and pad_token_id; "
                           f"got {decoder_start_token_id} and {pad_token_id}")
    labels_BT = jnp.asarray(labels_BT)
    start = jnp.full(labels_BT.shape[:-1] + (1,), decoder_start_token_id, labels_BT.dtype)
    shifted = jnp.concatenate([start, labels_BT[..., :-1]], axis=-1)
    return jnp.where(shifted == IGNORE, pad_token_id, shifted)


def padding_bias(mask_BU) -> jax.Array:
    """(B, U) 1/0 key mask -> additive float32 (B, 1, 1, U) bias (float32's min where masked)."""
    return jnp.where(mask_BU[:, None, None, :].astype(bool), 0.0, NEG).astype(jnp.float32)


def causal_bias(slot_mask_BS, query_slots_T) -> jax.Array:
    """(B, 1, T, S) additive bias: key slot s <= query slot t and not padding."""
    slots_S = jnp.arange(slot_mask_BS.shape[1])
    allowed_BTS = (slots_S[None, :] <= query_slots_T[:, None])[None] & slot_mask_BS[:, None, :].astype(bool)
    return jnp.where(allowed_BTS[:, None], 0.0, NEG).astype(jnp.float32)


def decoder_slots(decoder_attention_mask_BT, cache: Optional[Seq2SeqCache], T: int):
    """(slot mask (B, S), query slots (T,), cache index or None) for the decoder's self-attention."""
    if cache is None:
        return decoder_attention_mask_BT, jnp.arange(T), None
    index = cache.index
    slot_mask = jax.lax.dynamic_update_slice(cache.mask, decoder_attention_mask_BT.astype(jnp.int32), (0, index))
    return slot_mask, index + jnp.arange(T), index


def write_cache(kv: tuple, k_BTNH, v_BTNH, index):
    """Write new keys/values at slot `index`; -> (all keys, all values) of the cache."""
    k_BSNH = jax.lax.dynamic_update_slice(kv[0], k_BTNH.astype(kv[0].dtype), (0, index, 0, 0))
    v_BSNH = jax.lax.dynamic_update_slice(kv[1], v_BTNH.astype(kv[1].dtype), (0, index, 0, 0))
    return k_BSNH, v_BSNH


def decoder_inputs(cfg, decoder_input_ids, decoder_attention_mask, labels, who: str):
    """(decoder ids, decoder mask): given, or the labels shifted right; the mask defaults to all ones."""
    if decoder_input_ids is None:
        if labels is None:
            raise JaxtuneError(f"{who}: give decoder_input_ids or labels")
        decoder_input_ids = shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
    if decoder_attention_mask is None:
        decoder_attention_mask = jnp.ones(decoder_input_ids.shape, jnp.int32)
    return decoder_input_ids, decoder_attention_mask.astype(jnp.int32)


class Seq2SeqLM:
    """The forward of every `...ForConditionalGeneration` head (a mixin placed before nnx.Module):
    encode the source, build the decoder inputs (from `labels` shifted right when none are given),
    decode. The head supplies `config`, `encode(ids, mask, ...) -> (h, hidden_states)` and
    `decode(ids, mask, encoder_h, encoder_mask, ...) -> Seq2SeqOutput`."""

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 labels=None, token_type_ids=None, position_ids=None, *, deterministic: bool = True, rngs=None,
                 output_hidden_states: bool = False) -> Seq2SeqOutput:
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        dec_ids, dec_mask = decoder_inputs(self.config, decoder_input_ids, decoder_attention_mask, labels,
                                           type(self).__name__)
        enc, enc_hidden = self.encode(input_ids, attention_mask, deterministic=deterministic, rngs=rngs,
                                      output_hidden_states=output_hidden_states)
        out = self.decode(dec_ids, dec_mask, enc, attention_mask, deterministic=deterministic, rngs=rngs,
                          output_hidden_states=output_hidden_states)
        return out.replace(encoder_last_hidden_state=enc, encoder_hidden_states=enc_hidden)


__all__ = ["IGNORE", "Seq2SeqCache", "Seq2SeqLM", "Seq2SeqOutput", "causal_bias", "decoder_inputs", "decoder_slots",
           "padding_bias", "shift_tokens_right", "write_cache"]
