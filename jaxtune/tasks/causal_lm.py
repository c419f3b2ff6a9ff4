"""Causal language modelling: predict each next token; plain text or prompt/response pairs.

Batches: `input_ids`, `attention_mask`, `labels` (B, T) int with -100 where no loss applies
(padding; prompt tokens when training on responses only), `weights` (B,). Labels are NOT shifted
(as in transformers): the logits at position t are scored against `labels[t + 1]`.

Packed batches (several short examples per row) add `segment_ids` (B, T): 0 on padding, 1, 2, ...
for the examples of a row. The model then attends only within each example and restarts positions
at 0 in each; the loss never scores the first token of an example from the previous example's last
token (a target is used only when it has the same segment id as the position predicting it).
`pack_examples` builds such rows.

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

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.errors import JaxtuneError
from jaxtune.tasks.base import Task, example_weights, safe_div, weighted_mean

NAME = "causal-lm"
IGNORE = -100
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

    def predict(self, logits_BTV):
        """The most likely next token at each position."""
        return logits_BTV.argmax(-1)


def make(config=None, average: str = "token") -> CausalLM:
    return CausalLM(num_labels=0, average=average)


def pack_examples(
    examples: Iterable[dict],
    length: int,
    pad_id: int = 0,
    max_rows: Optional[int] = None,
) -> dict[str, np.ndarray]:
    """Pack examples (`input_ids`, optional `labels`, lists of ints) into rows of `length` tokens.

    First fit, in order: each example goes into the first row with room left (longer examples are
    cut to `length`). Returns numpy `input_ids`, `attention_mask`, `labels` (-100 on padding),
    `segment_ids` (1, 2, ... per row; 0 on padding), `position_ids` (restarting per example) and
    `weights` (1 per row), all (rows, length). `max_rows` caps the rows (more examples: an error).
    """
    rows: list[list[tuple[list, list]]] = []
    room: list[int] = []
    for ex in examples:
        ids = list(ex["input_ids"])[:length]
        labels = list(ex.get("labels", ids))[:length]
        if len(labels) != len(ids):
            raise JaxtuneError(f"pack_examples: labels ({len(labels)}) and input_ids ({len(ids)}) differ in length")
        if not ids:
            continue
        for r, left in enumerate(room):
            if left >= len(ids):
                rows[r].append((ids, labels))
                room[r] -= len(ids)
                break
        else:
            rows.append([(ids, labels)])
            room.append(length - len(ids))
    if max_rows is not None and len(rows) > max_rows:
        raise JaxtuneError(f"pack_examples: the examples need {len(rows)} rows of {length}, more than {max_rows}")
    R = len(rows)
    out = {
        "input_ids": np.full((R, length), pad_id, np.int32),
        "attention_mask": np.zeros((R, length), np.int32),
        "labels": np.full((R, length), IGNORE, np.int32),
        "segment_ids": np.zeros((R, length), np.int32),
        "position_ids": np.zeros((R, length), np.int32),
        "weights": np.ones((R,), np.float32),
    }
    for r, row in enumerate(rows):
        t = 0
        for s, (ids, labels) in enumerate(row, start=1):
            n = len(ids)
            out["input_ids"][r, t:t + n] = ids
            out["attention_mask"][r, t:t + n] = 1
            out["labels"][r, t:t + n] = labels
            out["segment_ids"][r, t:t + n] = s
            out["position_ids"][r, t:t + n] = np.arange(n)
            t += n
    return out


__all__ = ["AVERAGES", "CausalLM", "IGNORE", "NAME", "make", "pack_examples", "shifted_targets"]
