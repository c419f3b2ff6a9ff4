"""What decoder-only families (GPT-2, the Llama family) share: packed-row positions, the task heads
over a base model, and transformers' last-non-pad-token rule for sequence classification.

A family's heads subclass these with three class attributes: `base_prefix` (the attribute, and HF
key prefix, of the base model: GPT-2's `transformer`, Llama's `model`), `base_cls` (the base model
class) and, for causal LMs, `cache_cls` (its KV cache, with `init(config, batch, max_len)`). The
base model has `embed_tokens_attr` naming its word embedding (tied LM heads decode with it).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import JaxtuneError
from jaxtune.models.config import ConfigBase
from jaxtune.models.heads import run_base
from jaxtune.models.layers import linear


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
    """0, 1, 2, ... restarting wherever the segment id changes (packed examples).

    >>> segment_positions(jnp.array([[1, 1, 1, 2, 2, 0]])).tolist()
    [[0, 1, 2, 0, 1, 0]]
    """
    t = jnp.arange(segment_ids_BT.shape[1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


def last_token_index(input_ids_BT, pad_token_id: Optional[int], who: str) -> jax.Array:
    """transformers' rule: the rightmost token that is not `pad_token_id` (0 if all are pad).

    >>> last_token_index(jnp.array([[5, 6, 0, 0], [5, 6, 7, 8]]), 0, "m").tolist()
    [1, 3]
    """
    B, T = input_ids_BT.shape
    if pad_token_id is None:
        if B != 1:
            raise JaxtuneError(
                f"{who}: config pad_token_id is None, so the last token of a padded row is unknown "
                "(transformers refuses batches > 1 too); set pad_token_id, e.g. "
                "config_overrides={'pad_token_id': <the tokenizer's pad id>}")
        return jnp.full((B,), T - 1)
    non_pad_BT = (input_ids_BT != pad_token_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(T) * non_pad_BT, axis=-1)


class DecoderTaskModel(nnx.Module):
    """The base model under `base_prefix`, as in transformers."""

    base_prefix: ClassVar[str]
    base_cls: ClassVar[Any]

    def __init__(self, cfg: ConfigBase, *, rngs: nnx.Rngs):
        self.config = cfg
        setattr(self, self.base_prefix, self.base_cls(cfg, rngs=rngs))

    @property
    def base_model(self) -> nnx.Module:
        return getattr(self, self.base_prefix)

    def encode(self, input_ids, attention_mask, token_type_ids, position_ids, segment_ids, *, cache=None,
               deterministic, rngs, output_hidden_states):
        return run_base(self.base_model, input_ids, attention_mask, token_type_ids, position_ids, segment_ids,
                        cache=cache, deterministic=deterministic, rngs=rngs,
                        output_hidden_states=output_hidden_states)


class DecoderForCausalLM(DecoderTaskModel):
    """Next-token logits (B, T, V) from `lm_head`, or the word embeddings when tied."""

    cache_cls: ClassVar[Any]

    def __init__(self, cfg: ConfigBase, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        untied = not cfg.tie_word_embeddings
        self.lm_head = linear(cfg, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs=rngs,
                              std=cfg.initializer_range, use_bias=False) if untied else None

    def init_cache(self, batch: int, max_len: int):
        """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
        return self.cache_cls.init(self.config, batch, max_len)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 segment_ids=None, *, cache=None, last_only: bool = False,
                 deterministic: bool = True, rngs=None, output_hidden_states: bool = False):
        """`last_only`: logits of the last position only, (B, V) (decoding needs nothing else)."""
        out, _ = self.encode(input_ids, attention_mask, token_type_ids, position_ids, segment_ids, cache=cache,
                             deterministic=deterministic, rngs=rngs, output_hidden_states=output_hidden_states)
        h = out.last_hidden_state[:, -1] if last_only else out.last_hidden_state
        if self.lm_head is None:
            logits = getattr(self.base_model, self.base_model.embed_tokens_attr).attend(h)
        else:
            logits = self.lm_head(h)
        return out.replace(logits=logits.astype(jnp.float32))


class DecoderForSequenceClassification(DecoderTaskModel):
    """`score` (no bias) on the last non-pad token (see `last_token_index`)."""

    def __init__(self, cfg: ConfigBase, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.score = linear(cfg, cfg.hidden_size, cfg.num_labels, ("embed", "classes"), rngs=rngs,
                            std=cfg.initializer_range, use_bias=False)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 segment_ids=None, *, deterministic: bool = True, rngs=None, output_hidden_states: bool = False):
        who = type(self).__name__
        if segment_ids is not None:
            raise JaxtuneError(f"{who}: packed rows (segment_ids) are not supported")
        out, _ = self.encode(input_ids, attention_mask, token_type_ids, position_ids, None,
                             deterministic=deterministic, rngs=rngs, output_hidden_states=output_hidden_states)
        last_B = last_token_index(input_ids, self.config.pad_token_id, who)
        h_BD = jnp.take_along_axis(out.last_hidden_state, last_B[:, None, None], axis=1)[:, 0]
        return out.replace(logits=self.score(h_BD).astype(jnp.float32))
