"""Generation for encoder-decoder models (T5 / mT5, BART / Marian): greedy and beam search with a
KV cache, the same tokens as transformers' `generate` with the same settings.

    out = generate(model, input_ids, attention_mask, max_new_tokens=32)                 # greedy
    out = generate(model, ids, mask, num_beams=4, length_penalty=1.0, early_stopping=True)
    out.tokens    # (B, n) generated tokens (the decoder start token not included), pad after the end
    out.lengths   # (B,) tokens per row, EOS included
    texts = generate_text(model, tokenizer, ["translate English to German: Hello"], num_beams=4)

The encoder runs once; every decoder layer's cross-attention keys/values are computed once from
its output (`model.init_cache`), and the decoder then feeds one token per step against its
self-attention cache. Sources are right-padded to a power-of-two length (at least 8): the padding
is masked, and neither relative (T5) nor absolute (BART, Marian) positions of the real tokens
move, so results do not depend on it. Compilation: one jitted function (encoder, prefill, and the
whole loop as one `lax.while_loop`) per (model structure, batch, padded source length,
max_new_tokens, num_beams, early_stopping, special token ids); `length_penalty` is traced.

What transformers does, and so this module does:

- the decoder starts from `decoder_start_token_id` (T5: the pad token; BART: EOS);
- logits processors: `forced_bos_token_id` forces the first generated token, `forced_eos_token_id`
  the last one allowed by `max_new_tokens` (BART's and Marian's configs set it);
- greedy: argmax each step; a row that emitted EOS continues with `pad_token_id`; the loop ends
  when every row has or after `max_new_tokens`;
- beam search (transformers 5's vectorised `_beam_search`, step for step): running beams keep the
  best `num_beams` of the top 2 * num_beams (more with several EOS ids) continuations of
  log-softmax scores summed over the sequence; a continuation that emits EOS (or reaches the
  length limit) is scored sum / length ** length_penalty and may enter the `num_beams` finished
  hypotheses; `early_stopping` True stops a row once it has num_beams finished hypotheses, False
  stops when no running beam can beat the worst finished one at its current length, "never" at
  its best possible length. The best finished hypothesis of each row is returned.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import JaxtuneError

MIN_SOURCE_BUCKET = 8
BIG = 1.0e9  # transformers' "very large negative" for beams that must not be chosen
EarlyStopping = Union[bool, str]


@dataclass(frozen=True)
class Seq2SeqGenerateOutput:
    tokens: np.ndarray  # (B, n) int32: generated tokens, pad_token_id after each row's end
    lengths: np.ndarray  # (B,) int32: generated tokens per row, EOS included
    scores: Optional[np.ndarray] = None  # (B,) beam search: the returned hypotheses' scores


def source_bucket(length: int) -> int:
    """The padded source length: the next power of two, at least MIN_SOURCE_BUCKET."""
    return max(MIN_SOURCE_BUCKET, 1 << max(0, int(length) - 1).bit_length())


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    return tuple(int(v) for v in value)


def force_tokens(logits_NV, cur_len, max_length: int, forced_bos: Optional[int], forced_eos: tuple):
    """transformers' ForcedBOS / ForcedEOS logits processors: at decoder length 1 only
    `forced_bos` may follow, at max_length - 1 only the `forced_eos` ids (their score becomes 0,
    every other -inf)."""
    V = logits_NV.shape[-1]
    if forced_bos is not None:
        only = jnp.where(jnp.arange(V) == forced_bos, 0.0, -jnp.inf)
        logits_NV = jnp.where(cur_len == 1, only[None], logits_NV)
    if forced_eos:
        only = jnp.where(jnp.isin(jnp.arange(V), jnp.asarray(forced_eos)), 0.0, -jnp.inf)
        logits_NV = jnp.where(cur_len == max_length - 1, only[None], logits_NV)
    return logits_NV


def _prefill(model, ids_BU, mask_BU, start: int, max_length: int):
    """Encoder, cross-attention cache, and the decoder on the start token -> (cache, logits (B, V))."""
    encoder_BUD, _ = model.encode(ids_BU, mask_BU)
    cache = model.init_cache(encoder_BUD, mask_BU, max_length)
    B = ids_BU.shape[0]
    start_B1 = jnp.full((B, 1), start, jnp.int32)
    out = model.decode(start_B1, jnp.ones((B, 1), jnp.int32), None, None, cache=cache, last_only=True)
    return out.past_key_values, out.logits


def _step(model, cache, tokens_B):
    out = model.decode(tokens_B[:, None], jnp.ones((tokens_B.shape[0], 1), jnp.int32), None, None, cache=cache,
                       last_only=True)
    return out.past_key_values, out.logits


def greedy_search(model, ids_BU, mask_BU, *, max_new_tokens: int, start: int, eos: tuple, pad: int,
                  forced_bos: Optional[int] = None, forced_eos: tuple = ()):
    """Greedy decoding, traceable (jit it, or call it inside a jitted step) -> (tokens (B, N) with
    pad after each row's end, lengths (B,), steps taken)."""
    max_length = max_new_tokens + 1  # the start token + new tokens, transformers' max_length
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    B = ids_BU.shape[0]
    cache, logits_BV = _prefill(model, ids_BU, mask_BU, start, max_length)
    carry = (jnp.int32(1), cache, logits_BV, jnp.full((B, max_new_tokens), pad, jnp.int32),
             jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))

    def cond(c):
        cur, _, _, _, done_B, _ = c
        return (cur < max_length) & ~jnp.all(done_B)

    def body(c):
        cur, cache, logits_BV, tokens_BN, done_B, lengths_B = c
        logits_BV = force_tokens(logits_BV, cur, max_length, forced_bos, forced_eos)
        token_B = jnp.where(done_B, pad, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))
        tokens_BN = tokens_BN.at[:, cur - 1].set(token_B)
        lengths_B = lengths_B + (~done_B).astype(jnp.int32)
        done_B = done_B | jnp.isin(token_B, eos_arr)
        cache, logits_BV = _step(model, cache, token_B)
        return cur + 1, cache, logits_BV, tokens_BN, done_B, lengths_B

    cur, _, _, tokens_BN, _, lengths_B = jax.lax.while_loop(cond, body, carry)
    return tokens_BN, lengths_B, cur - 1


@functools.lru_cache(maxsize=32)
def _compiled_greedy(graphdef, max_new_tokens: int, start: int, eos: tuple, pad: int, forced_bos, forced_eos: tuple):
    def run(state, ids_BU, mask_BU):
        return greedy_search(nnx.merge(graphdef, state), ids_BU, mask_BU, max_new_tokens=max_new_tokens,
                             start=start, eos=eos, pad=pad, forced_bos=forced_bos, forced_eos=forced_eos)

    return jax.jit(run)


def _gather(x_BK, index_BJ):
    """x[b, index[b, j]] for arrays (B, K, ...) and indices (B, J)."""
    index = index_BJ.reshape(index_BJ.shape + (1,) * (x_BK.ndim - 2))
    return jnp.take_along_axis(x_BK, index, axis=1)


def beam_search(model, ids_BU, mask_BU, length_penalty, *, max_new_tokens: int, num_beams: int,
                early_stopping: EarlyStopping, start: int, eos: tuple, pad: int, forced_bos: Optional[int] = None,
                forced_eos: tuple = ()):
    """Beam search, traceable -> (best hypothesis (B, N) with pad after its end, lengths (B,),
    scores (B,)); `length_penalty` may be traced."""
    K, L = num_beams, max_new_tokens + 1
    keep = max(2, 1 + len(eos)) * K  # candidates looked at per row (transformers' beams_to_keep)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    top_k_mask = jnp.arange(keep) < K  # only the top num_beams candidates may finish
    B = ids_BU.shape[0]
    # Each row's K beams are rows b * K + k, as transformers expands the batch.
    cache, logits_NV = _prefill(model, jnp.repeat(ids_BU, K, axis=0), jnp.repeat(mask_BU, K, axis=0), start, L)
    V = logits_NV.shape[-1]
    running_seq = jnp.full((B, K, L), pad, jnp.int32).at[:, :, 0].set(start)
    running_scores = jnp.zeros((B, K), jnp.float32).at[:, 1:].set(-BIG)
    carry = dict(cur=jnp.int32(1), cache=cache, logits=logits_NV, running_seq=running_seq,
                 running_scores=running_scores, seqs=running_seq, scores=jnp.full((B, K), -BIG, jnp.float32),
                 lengths=jnp.zeros((B, K), jnp.int32), finished=jnp.zeros((B, K), bool),
                 unsatisfied=jnp.ones((B, 1), bool), go=jnp.bool_(True))

    def body(c):
        cur = c["cur"]
        log_probs = jax.nn.log_softmax(c["logits"].astype(jnp.float32), axis=-1)
        log_probs = force_tokens(log_probs, cur, L, forced_bos, forced_eos)
        log_probs = log_probs.reshape(B, K, V) + c["running_scores"][:, :, None]
        top_lp, top_idx = jax.lax.top_k(log_probs.reshape(B, K * V), keep)
        beam_BJ, token_BJ = top_idx // V, (top_idx % V).astype(jnp.int32)
        top_seq = _gather(c["running_seq"], beam_BJ)
        top_seq = jax.lax.dynamic_update_slice_in_dim(top_seq, token_BJ[:, :, None], cur, axis=2)
        hits = jnp.isin(token_BJ, eos_arr) | (cur + 1 >= L)  # EOS or max-length criteria

        # the running beams of the next step: the best that did not just stop
        run_lp = top_lp + hits.astype(jnp.float32) * -BIG
        _, next_j = jax.lax.top_k(run_lp, K)
        running_seq, running_scores = _gather(top_seq, next_j), _gather(run_lp, next_j)
        source_rows = (_gather(beam_BJ, next_j) + jnp.arange(B)[:, None] * K).reshape(-1)

        # the finished hypotheses: merge those that just stopped, scored with the length penalty
        just = hits & top_k_mask[None]
        fin_lp = top_lp / (cur.astype(jnp.float32) ** length_penalty)
        full = jnp.all(c["finished"], axis=-1, keepdims=True) & (early_stopping is True)
        fin_lp = fin_lp + full * -BIG + (~c["unsatisfied"]) * -BIG + (~just) * -BIG
        merged_scores = jnp.concatenate([c["scores"], fin_lp], axis=1)
        _, best = jax.lax.top_k(merged_scores, K)
        seqs = _gather(jnp.concatenate([c["seqs"], top_seq], axis=1), best)
        lengths = _gather(jnp.concatenate([c["lengths"], jnp.full((B, keep), cur, jnp.int32)], axis=1), best)
        finished = _gather(jnp.concatenate([c["finished"], just], axis=1), best)
        scores = _gather(merged_scores, best)

        cache = c["cache"].reorder(source_rows)
        cache, logits = _step(model, cache, running_seq[:, :, cur].reshape(-1))
        cur = cur + 1
        # can a running beam still beat the worst finished hypothesis?
        if early_stopping == "never":
            best_len = jnp.where(length_penalty > 0.0, L - 1, cur - 1).astype(jnp.float32)
        else:
            best_len = (cur - 1).astype(jnp.float32)
        best_running = running_scores[:, :1] / best_len ** length_penalty
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), -BIG)
        unsatisfied = c["unsatisfied"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
        go = (jnp.any(unsatisfied) & ~(jnp.all(finished) & (early_stopping is True)) & ~jnp.all(hits))
        return dict(cur=cur, cache=cache, logits=logits, running_seq=running_seq, running_scores=running_scores,
                    seqs=seqs, scores=scores, lengths=lengths, finished=finished, unsatisfied=unsatisfied, go=go)

    c = jax.lax.while_loop(lambda c: c["go"], body, carry)
    return c["seqs"][:, 0, 1:], c["lengths"][:, 0], c["scores"][:, 0]


@functools.lru_cache(maxsize=32)
def _compiled_beam(graphdef, max_new_tokens: int, num_beams: int, early_stopping: EarlyStopping, start: int,
                   eos: tuple, pad: int, forced_bos, forced_eos: tuple):
    def run(state, ids_BU, mask_BU, length_penalty):
        return beam_search(nnx.merge(graphdef, state), ids_BU, mask_BU, length_penalty,
                           max_new_tokens=max_new_tokens, num_beams=num_beams, early_stopping=early_stopping,
                           start=start, eos=eos, pad=pad, forced_bos=forced_bos, forced_eos=forced_eos)

    return jax.jit(run)


def token_settings(cfg, eos_token_id=None, pad_token_id=None, decoder_start_token_id=None, forced_bos_token_id=-1,
                   forced_eos_token_id=-1) -> dict:
    """The special ids generation uses: the arguments, else the model config's (see `generate`).
    -> {start, eos (tuple), pad, forced_bos (int or None), forced_eos (tuple)}."""
    eos = _ids(cfg.eos_token_ids if eos_token_id is None else eos_token_id)
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    pad = int(pad if pad is not None else (eos[0] if eos else 0))
    start = decoder_start_token_id if decoder_start_token_id is not None else cfg.decoder_start_token_id
    if start is None:
        start = getattr(cfg, "bos_token_id", None)
    if start is None:
        raise JaxtuneError("generate: the config has no decoder_start_token_id (nor bos_token_id); pass one")
    forced_bos = getattr(cfg, "forced_bos_token_id", None) if forced_bos_token_id == -1 else forced_bos_token_id
    forced_eos = _ids(getattr(cfg, "forced_eos_token_id", None) if forced_eos_token_id == -1 else forced_eos_token_id)
    return dict(start=int(start), eos=eos, pad=pad, forced_bos=None if forced_bos is None else int(forced_bos),
                forced_eos=forced_eos)


def generate(
    model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: EarlyStopping = False,
    eos_token_id: Optional[int | Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    decoder_start_token_id: Optional[int] = None,
    forced_bos_token_id: Optional[int] = -1,
    forced_eos_token_id: Optional[int | Sequence[int]] = -1,
) -> Seq2SeqGenerateOutput:
    """Greedy (`num_beams` 1) or beam search after each source row (see the module docstring).

    `input_ids` (B, U) int, `attention_mask` (B, U) 0/1 (None: no padding). Token ids default to
    the model config's (`eos_token_id=()` disables EOS stopping); `forced_*_token_id` -1: the
    config's, None: none. The returned tokens stop at the longest row; shorter rows hold
    `pad_token_id` after their end.
    """
    if not hasattr(model, "init_cache") or not hasattr(model, "encode"):
        raise JaxtuneError(f"generate: {type(model).__name__} is not an encoder-decoder LM head")
    cfg = model.config
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise JaxtuneError(f"generate: input_ids must be (batch, tokens) with tokens > 0, got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
    if max_new_tokens < 1:
        raise JaxtuneError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise JaxtuneError(f"generate: num_beams must be >= 1, got {num_beams}")
    if early_stopping not in (True, False, "never"):
        raise JaxtuneError(f"generate: early_stopping must be true, false or 'never', got {early_stopping!r}")
    real = mask.astype(bool).sum(1)
    if (real == 0).any():
        raise JaxtuneError(f"generate: source row {int(np.argmin(real))} has no tokens (attention_mask all 0)")
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and (ids.shape[1] > limit or max_new_tokens + 1 > limit):
        raise JaxtuneError(f"generate: the source ({ids.shape[1]} tokens) or the start token + max_new_tokens "
                           f"({max_new_tokens}) exceeds the model's {limit} positions")
    ids_ = token_settings(cfg, eos_token_id, pad_token_id, decoder_start_token_id, forced_bos_token_id,
                          forced_eos_token_id)
    start, eos, pad, forced_bos, forced_eos = (ids_[k] for k in ("start", "eos", "pad", "forced_bos", "forced_eos"))
    U = source_bucket(ids.shape[1])
    if limit is not None:  # padding never reaches past the position table (BART, Marian)
        U = min(U, limit)
    ids_BU = np.full((ids.shape[0], U), pad, np.int32)
    mask_BU = np.zeros((ids.shape[0], U), np.int32)
    ids_BU[:, :ids.shape[1]], mask_BU[:, :ids.shape[1]] = ids, mask
    graphdef, state = nnx.split(model)
    if num_beams == 1:
        run = _compiled_greedy(graphdef, int(max_new_tokens), start, eos, pad, forced_bos, forced_eos)
        tokens, lengths, steps = run(state, ids_BU, mask_BU)
        return Seq2SeqGenerateOutput(tokens=np.asarray(tokens)[:, :int(steps)], lengths=np.asarray(lengths))
    # transformers fills beam outputs with `pad_token_id or eos_token_id[0]` (so EOS when pad is 0);
    # here rows end in pad_token_id, as greedy rows do.
    run = _compiled_beam(graphdef, int(max_new_tokens), int(num_beams), early_stopping, start, eos, pad,
                         forced_bos, forced_eos)
    tokens, lengths, scores = run(state, ids_BU, mask_BU, jnp.float32(length_penalty))
    lengths = np.asarray(lengths)
    return Seq2SeqGenerateOutput(tokens=np.asarray(tokens)[:, :int(lengths.max())], lengths=lengths,
                                 scores=np.asarray(scores))


def generate_text(model, tokenizer, sources: str | Sequence[str], *, prefix: str = "", max_length: int = 512,
                  **kwargs) -> list[str]:
    """Generate from source strings (each after `prefix`, tokenized with the tokenizer's special
    tokens, truncated to `max_length`); returns the decoded targets (special tokens skipped)."""
    if isinstance(sources, str):
        sources = [sources]
    enc = tokenizer([prefix + s for s in sources], truncation=True, max_length=max_length, padding="longest",
                    return_tensors="np")
    out = generate(model, enc["input_ids"], enc["attention_mask"], **kwargs)
    return [tokenizer.decode(out.tokens[i, :out.lengths[i]], skip_special_tokens=True) for i in range(len(sources))]


__all__ = ["Seq2SeqGenerateOutput", "beam_search", "force_tokens", "generate", "generate_text", "greedy_search",
           "source_bucket", "token_settings"]
