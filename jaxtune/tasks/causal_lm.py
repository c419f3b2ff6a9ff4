"""Causal language modelling: predict each next token; plain text or prompt/response pairs.

Batches: `input_ids`, `attention_mask`, `labels` (B, T) int with -100 where no loss applies
(padding; prompt tokens when training on responses only), `weights` (B,). Labels are NOT shifted
(as in transformers): the logits at position t are scored against `labels[t + 1]`.

Packed batches (several short examples per row) add `segment_ids` (B, T): 0 on padding, 1, 2, ...
for the examples of a row. The model then attends only within each example and restarts positions
at 0 in each; the loss never scores the first token of an example from the previous example's last
token (a target is used only when it has the same segment id as the position predicting it).
`pack_examples` builds such rows (first fit, as `data.pack` does: `jaxtune.data.packing`).

The loss, with `average`:

- `"token"` (default, as transformers): the mean over every target token of the batch, each token
  weighted by its row's `weights`. A packed batch and the same examples unpacked (one per row) give
  the same loss: the mean of the per-example losses, each weighted by its number of target tokens.
- `"example"`: each example's mean token loss, then the mean over examples weighted by `weights`
  (packed examples count one each); then a packed batch gives exactly the plain mean of per-example
  losses.

Metrics over a split are always per token: `loss` (mean token cross-entropy), `perplexity`
(exp of it) and `accuracy` (next-token argmax accuracy).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.data.chat import ChatFormat
from jaxtune.data.packing import pack_examples  # re-exported: packed rows for this task's loss
from jaxtune.data.text import IGNORE
from jaxtune.errors import DataError, JaxtuneError
from jaxtune.models.generate import generate
from jaxtune.tasks.base import Task, example_weights, safe_div, weighted_mean
from jaxtune.tasks.predicting import tokenizer_of

NAME = "causal-lm"
DEFAULT_NEW_TOKENS = 50
AVERAGES = ("token", "example")


def shifted_targets(logits_BTV, batch):
    """(logits (B, T-1, V), targets (B, T-1) int, valid (B, T-1) bool, segment (B, T-1) or None)."""
    labels_BT = batch["labels"]
    logits = logits_BTV[:, :-1]
    targets = labels_BT[:, 1:]
    valid = targets != IGNORE
    segments = batch.get("segment_ids")
    if segments is not None:
        segments_BT = jnp.asarray(segments)
        valid = valid & (segments_BT[:, 1:] == segments_BT[:, :-1]) & (segments_BT[:, 1:] != 0)
        segments = segments_BT[:, 1:]
    return logits, jnp.where(valid, targets, 0).astype(jnp.int32), valid, segments


@dataclass(frozen=True)
class CausalLM(Task):
    name: str = NAME
    head: str = NAME
    data_kind: ClassVar[str] = "lm"
    predict_options: ClassVar[tuple[str, ...]] = ("max_new_tokens", "do_sample", "temperature", "top_k",
                                                  "top_p", "seed", "chat_template")
    average: str = "token"

    def __post_init__(self):
        if self.average not in AVERAGES:
            raise JaxtuneError(f"causal-lm: average '{self.average}' is not one of {', '.join(AVERAGES)}")

    def _terms(self, logits_BTV, batch):
        logits, targets, valid, segments = shifted_targets(logits_BTV, batch)
        B = logits.shape[0]
        loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        w_BT = example_weights(batch, B)[:, None] * valid
        return logits, targets, valid, segments, loss_BT, w_BT

    def loss(self, logits_BTV, batch):
        logits, targets, valid, segments, loss_BT, w_BT = self._terms(logits_BTV, batch)
        acc = weighted_mean((logits.argmax(-1) == targets).astype(jnp.float32), w_BT)
        aux = {"accuracy": acc, "tokens": jnp.sum(valid.astype(jnp.float32))}
        if self.average == "token":
            return weighted_mean(loss_BT, w_BT), aux
        return self._example_mean(loss_BT, valid, segments, example_weights(batch, logits.shape[0])), aux

    @staticmethod
    def _example_mean(loss_BT, valid_BT, segments_BT, w_B):
        """Mean over examples (segments of a row, or whole rows) of each one's mean token loss."""
        B, T = loss_BT.shape
        seg_BT = jnp.zeros((B, T), jnp.int32) if segments_BT is None else segments_BT.astype(jnp.int32)
        # One id per (row, segment); segment ids are < T + 1 in a row of T + 1 tokens.
        gid_BT = jnp.arange(B)[:, None] * (T + 1) + jnp.clip(seg_BT, 0, T)
        n = B * (T + 1)
        v = valid_BT.astype(jnp.float32)
        count = jax.ops.segment_sum(v.reshape(-1), gid_BT.reshape(-1), num_segments=n)
        total = jax.ops.segment_sum((v * loss_BT).reshape(-1), gid_BT.reshape(-1), num_segments=n)
        per_example = total / jnp.maximum(count, 1.0)
        w_G = jnp.repeat(w_B, T + 1) * (count > 0)
        return weighted_mean(per_example, w_G)

    def outputs(self, logits_BTV, batch) -> dict:
        logits, targets, _, _, loss_BT, w_BT = self._terms(logits_BTV, batch)
        out = {
            "loss_sum": jnp.sum(w_BT * loss_BT),
            "weight_sum": jnp.sum(w_BT),
            "correct": jnp.sum(w_BT * (logits.argmax(-1) == targets)),
        }
        return {k: v.astype(jnp.float32) for k, v in out.items()}

    def metrics(self, totals: dict) -> dict:
        loss = safe_div(totals["loss_sum"], totals["weight_sum"])
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": safe_div(totals["correct"], totals["weight_sum"]),
            "tokens": float(totals["weight_sum"]),
        }

    def metric_names(self) -> tuple[str, ...]:
        return ("loss", "perplexity", "accuracy", "tokens")

    def predict(self, loaded, prompts: Sequence[str], *, max_new_tokens: Optional[int] = None,
                do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                seed: int = 0, chat_template: bool = True) -> list[dict]:
        """Generate after each prompt (all in one batch), with the KV cache.

        When the tokenizer has a chat template (and `chat_template`, the default), a prompt is a
        one-turn user message rendered with it and its generation prompt (as training rendered
        prompt/response pairs), tokenized as rendered; `generated` is then the reply alone.
        Otherwise (`chat_template=False`, `jaxtune predict --raw`) a prompt is tokenized as
        training tokenized plain prompts (with the tokenizer's special tokens, e.g. a BOS it adds);
        an empty prompt starts from the BOS token. Greedy unless `do_sample`.
        `max_new_tokens` None: up to 50, fewer when the model's positions run out.
        Returns per prompt: input, generated (decoded new text, special tokens skipped), tokens
        (new token ids, EOS included) and stopped ('eos' or 'length').
        """
        tok = tokenizer_of(loaded)
        config = loaded.model.config
        bos = tok.bos_token_id if tok.bos_token_id is not None else getattr(config, "bos_token_id", None)
        # a run's recipe may give the system prompt it trained with (data.system_prompt)
        system = getattr(getattr(loaded.recipe, "data", None), "system_prompt", None)
        chat = ChatFormat.of(tok, system) if chat_template else None
        encoded = []
        for p in prompts:
            if chat is not None:
                encoded.append(list(tok(chat.prompt(p), add_special_tokens=False)["input_ids"]))
                continue
            ids = list(tok(p)["input_ids"])
            if not ids:
                if bos is None:
                    raise DataError("an empty prompt needs a BOS token, and neither the tokenizer nor "
                                    "the model has one")
                ids = [int(bos)]
            encoded.append(ids)
        longest = max(len(e) for e in encoded)
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and longest >= limit:
            raise DataError(f"the longest prompt has {longest} tokens; the model has {limit} positions")
        if max_new_tokens is None:
            max_new_tokens = DEFAULT_NEW_TOKENS if limit is None else min(DEFAULT_NEW_TOKENS, limit - longest)
        ids = np.zeros((len(encoded), longest), np.int32)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encoded):  # left-padded, as generate() wants
            ids[i, longest - len(e):], mask[i, longest - len(e):] = e, 1
        out = generate(loaded.model, ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        results = []
        for i, p in enumerate(prompts):
            new = [int(t) for t in out.tokens[i, : out.lengths[i]]]
            stopped = "eos" if _ends_with_eos(new, config) else "length"
            results.append({"input": p, "generated": tok.decode(new, skip_special_tokens=True),
                            "tokens": new, "stopped": stopped})
        return results

    def format(self, r: dict) -> str:
        """'"3 plus 4 is" -> " seven"' (both JSON-quoted: spaces and newlines stay visible)."""
        return (f"{json.dumps(r['input'], ensure_ascii=False)} -> "
                f"{json.dumps(r['generated'], ensure_ascii=False)}")


def _ends_with_eos(tokens: list[int], config) -> bool:
    eos = getattr(config, "eos_token_ids", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return bool(tokens) and tokens[-1] in eos


def make(config=None, average: str = "token") -> CausalLM:
    return CausalLM(num_labels=0, average=average)


__all__ = ["AVERAGES", "CausalLM", "IGNORE", "NAME", "make", "pack_examples", "shifted_targets"]
