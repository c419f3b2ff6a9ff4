"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), EOS stopping.

    out = generate(model, input_ids, attention_mask, max_new_tokens=20)            # greedy
    out = generate(model, ids, mask, do_sample=True, temperature=0.8, top_p=0.9, seed=1)
    out.tokens      # (B, n) new tokens, pad_token_id after a row's EOS; n <= max_new_tokens
    out.lengths     # (B,) new tokens per row, EOS included
    out.sequences   # (B, T' + n) the left-padded prompts followed by the new tokens
    texts = generate_text(model, tokenizer, ["Once upon a time"], max_new_tokens=30)

Works with any causal-LM head that has `init_cache(batch, max_len)` and takes
`(input_ids, attention_mask, position_ids=..., cache=..., last_only=True)` (jaxtune's GPT-2).

As transformers' `generate` does for decoder-only models: prompts are left-padded (right-padded
input is re-aligned here), positions are `cumsum(attention_mask) - 1` and grow by one per new
token, finished rows emit `pad_token_id`, and the loop ends when every row has emitted an EOS
token or `max_new_tokens` were generated. Sampling applies temperature, then top-k, then top-p
(nucleus), like transformers' warpers, then draws from the softmax.

Compilation: the prompt length is padded up to a power of two (at least 8), and the prefill and
the whole decoding loop (one `lax.while_loop`) are one jitted function per (model structure, batch
size, padded prompt length, max_new_tokens, greedy/sampled, EOS/pad ids). Temperature, top-k, top-p
and the seed are traced, so changing them does not recompile.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import JaxtuneError

MIN_PROMPT_BUCKET = 8


@dataclass(frozen=True)
class GenerateOutput:
    tokens: np.ndarray  # (B, n) int32: new tokens, pad_token_id after EOS
    lengths: np.ndarray  # (B,) int32: new tokens per row, EOS included
    sequences: np.ndarray  # (B, T' + n) int32: left-padded prompt + new tokens
    prompt_mask: np.ndarray  # (B, T') int32: 1 on the prompt's real tokens


def prompt_bucket(length: int) -> int:
    """The padded prompt length: the next power of two, at least MIN_PROMPT_BUCKET."""
    return max(MIN_PROMPT_BUCKET, 1 << max(0, int(length) - 1).bit_length())


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray, length: int, pad_id: int):
    """Move each row's real tokens (mask 1, order kept) to the right end of a `length` row."""
    B, T = input_ids.shape
    ids = np.full((B, length), pad_id, np.int32)
    mask = np.zeros((B, length), np.int32)
    for b in range(B):
        real = input_ids[b][attention_mask[b].astype(bool)]
        if len(real):
            ids[b, length - len(real):] = real
            mask[b, length - len(real):] = 1
    return ids, mask


def sample_logits(logits_BV: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """One token per row: logits / temperature, keep the top_k (0: all), keep the smallest set of
    most likely tokens whose probability reaches top_p (1.0: all; the most likely always stays),
    then draw from the softmax of what is left."""
    logits = logits_BV.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    V = logits.shape[-1]
    desc_BV = -jnp.sort(-logits, axis=-1)
    k = jnp.clip(jnp.asarray(top_k, jnp.int32), 0, V)
    kth_B1 = jnp.take_along_axis(desc_BV, jnp.broadcast_to(jnp.maximum(k - 1, 0), (logits.shape[0], 1)), axis=-1)
    logits = jnp.where((k > 0) & (logits < kth_B1), -jnp.inf, logits)
    # top-p on what top-k left: drop a token when the mass of the tokens ranked above it >= top_p.
    order_BV = jnp.argsort(-logits, axis=-1)
    sorted_BV = jnp.take_along_axis(logits, order_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    drop_sorted = (before_BV >= jnp.asarray(top_p, jnp.float32)).at[:, 0].set(False)
    drop_BV = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order_BV].set(drop_sorted)
    logits = jnp.where(drop_BV, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, max_new_tokens: int, do_sample: bool, eos_ids: tuple, pad_id: int):
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def run(state, ids_BT, mask_BT, rng, temperature, top_k, top_p):
        model = nnx.merge(graphdef, state)
        B, T = ids_BT.shape
        pos_BT = jnp.where(mask_BT == 1, jnp.cumsum(mask_BT, axis=1) - 1, 0)
        cache = model.init_cache(B, T + max_new_tokens)
        out = model(ids_BT, mask_BT, position_ids=pos_BT, cache=cache, last_only=True)
        tokens_BN = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
        carry = (jnp.int32(0), out.past_key_values, out.logits, pos_BT[:, -1] + 1, tokens_BN,
                 jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))

        def cond(c):
            i, _, _, _, _, done, _ = c
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(c):
            i, cache, logits_BV, pos_B, tokens_BN, done_B, lengths_B = c
            if do_sample:
                token_B = sample_logits(logits_BV, jax.random.fold_in(rng, i), temperature, top_k, top_p)
            else:
                token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
            token_B = jnp.where(done_B, pad_id, token_B)
            tokens_BN = tokens_BN.at[:, i].set(token_B)
            lengths_B = lengths_B + (~done_B).astype(jnp.int32)
            done_B = done_B | jnp.isin(token_B, eos)
            out = model(token_B[:, None], jnp.ones((B, 1), jnp.int32), position_ids=pos_B[:, None], cache=cache,
                        last_only=True)
            return i + 1, out.past_key_values, out.logits, pos_B + 1, tokens_BN, done_B, lengths_B

        carry = jax.lax.while_loop(cond, body, carry)
        return carry[4], carry[6], carry[0]

    return jax.jit(run)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    return tuple(int(v) for v in value)


def generate(
    model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Optional[int | Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    seed: int | jax.Array = 0,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens after each prompt row (see the module docstring).

    `input_ids` (B, T) int, `attention_mask` (B, T) 0/1 (None: no padding), padded on either side.
    `eos_token_id`: None uses the model config's (`()` disables EOS stopping); `pad_token_id`: None
    uses the config's, else the first EOS id, else 0. `seed`: an int or a PRNG key (sampling only).
    """
    if not hasattr(model, "init_cache"):
        raise JaxtuneError(f"generate: {type(model).__name__} is not a causal-LM head with a KV cache")
    cfg = model.config
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise JaxtuneError(f"generate: input_ids must be (batch, tokens) with tokens > 0, got shape {ids.shape}")
    if max_new_tokens < 1:
        raise JaxtuneError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise JaxtuneError(f"generate: temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise JaxtuneError(f"generate: top_p must be in (0, 1], got {top_p}")
    real = mask.astype(bool).sum(1)
    if (real == 0).any():
        raise JaxtuneError(f"generate: prompt row {int(np.argmin(real))} has no tokens (attention_mask all 0)")
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and int(real.max()) + max_new_tokens > limit:
        raise JaxtuneError(
            f"generate: the longest prompt ({int(real.max())} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's {limit} positions"
        )
    eos = _ids(getattr(cfg, "eos_token_ids", getattr(cfg, "eos_token_id", None))
               if eos_token_id is None else eos_token_id)
    pad = pad_token_id if pad_token_id is not None else getattr(cfg, "pad_token_id", None)
    pad = int(pad if pad is not None else (eos[0] if eos else 0))

    ids_BT, mask_BT = left_align(ids, mask, prompt_bucket(int(real.max())), pad)
    rng = jax.random.PRNGKey(seed) if isinstance(seed, (int, np.integer)) else seed
    graphdef, state = nnx.split(model)
    run = _compiled(graphdef, int(max_new_tokens), bool(do_sample), eos, pad)
    tokens, lengths, steps = run(state, ids_BT, mask_BT, rng, float(temperature), int(top_k), float(top_p))
    n = int(steps)
    tokens = np.asarray(tokens)[:, :n]
    # Drop the bucket's extra columns that no row needs (all padding).
    keep = ids_BT.shape[1] - int(real.max())
    return GenerateOutput(
        tokens=tokens,
        lengths=np.asarray(lengths),
        sequences=np.concatenate([ids_BT[:, keep:], tokens], axis=1),
        prompt_mask=mask_BT[:, keep:],
    )


def generate_text(model, tokenizer, prompts: str | Sequence[str], **kwargs) -> list[str]:
    """Generate after each prompt string; returns the decoded new text of each (special tokens
    skipped). An empty prompt starts from the BOS token. `kwargs` go to `generate`."""
    if isinstance(prompts, str):
        prompts = [prompts]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(model.config, "bos_token_id", None)
    if any(not e for e in encoded) and bos is None:
        raise JaxtuneError("generate_text: an empty prompt needs a BOS token, and neither the tokenizer nor "
                           "the model config has one")
    encoded = [list(e) or [bos] for e in encoded]  # an empty prompt starts from BOS
    T = max(len(e) for e in encoded)
    ids = np.zeros((len(encoded), T), np.int32)
    mask = np.zeros((len(encoded), T), np.int32)
    for i, e in enumerate(encoded):
        ids[i, T - len(e):], mask[i, T - len(e):] = e, 1
    out = generate(model, ids, mask, **kwargs)
    return [tokenizer.decode(out.tokens[i, : out.lengths[i]], skip_special_tokens=True) for i in range(len(prompts))]


__all__ = ["GenerateOutput", "generate", "generate_text", "left_align", "prompt_bucket", "sample_logits"]
