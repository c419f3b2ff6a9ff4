"""Token classification (NER, POS): one label per token, -100 where no label applies.

Labels (B, T) int with -100 on padding, special tokens and non-first sub-words. The loss is the
mean cross-entropy over labelled tokens (as transformers computes it), each token weighted by its
example's `batch['weights']`. Metrics over a split are token level: `loss`, `accuracy` and
`macro_f1` over the classes that occur as label or prediction (entity-level seqeval F1 needs the
label scheme and is left to the caller, from `predict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import jax.numpy as jnp
import optax

from jaxtune.tasks.base import Task, confusion_sums, example_weights, macro_f1, safe_div, weighted_mean
from jaxtune.tasks.predicting import forward, label_names, softmax, text_inputs, tokenizer_of

NAME = "token-classification"
IGNORE = -100


@dataclass(frozen=True)
class TokenClassification(Task):
    name: str = NAME
    head: str = NAME
    data_kind: ClassVar[str] = "tokens"

    def _token_terms(self, logits_BTK, batch):
        labels_BT = batch["labels"]
        w_BT = example_weights(batch, logits_BTK.shape[0])[:, None] * (labels_BT != IGNORE)
        safe_BT = jnp.where(labels_BT == IGNORE, 0, labels_BT).astype(jnp.int32)
        loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTK, safe_BT)
        return safe_BT, w_BT, loss_BT

    def loss(self, logits_BTK, batch):
        labels_BT, w_BT, loss_BT = self._token_terms(logits_BTK, batch)
        acc = weighted_mean((logits_BTK.argmax(-1) == labels_BT).astype(jnp.float32), w_BT)
        return weighted_mean(loss_BT, w_BT), {"accuracy": acc}

    def outputs(self, logits_BTK, batch) -> dict:
        labels_BT, w_BT, loss_BT = self._token_terms(logits_BTK, batch)
        pred_BT = logits_BTK.argmax(-1)
        out = {
            "loss_sum": jnp.sum(w_BT * loss_BT),
            "weight_sum": jnp.sum(w_BT),
            "correct": jnp.sum(w_BT * (pred_BT == labels_BT)),
            **confusion_sums(pred_BT, labels_BT, w_BT, logits_BTK.shape[-1]),
        }
        return {k: v.astype(jnp.float32) for k, v in out.items()}

    def metrics(self, totals: dict) -> dict:
        n = totals["weight_sum"]
        return {
            "loss": safe_div(totals["loss_sum"], n),
            "accuracy": safe_div(totals["correct"], n),
            "macro_f1": macro_f1(totals["tp"], totals["fp"], totals["fn"], present_only=True),
        }

    def metric_names(self) -> tuple[str, ...]:
        return ("loss", "accuracy", "macro_f1")

    def predict(self, loaded, texts: Sequence[str], *, batch: int = 32) -> list[dict]:
        """Each text is split on whitespace into words (as a CoNLL-style training file lists them),
        and each word gets the tag of its first sub-token, as in training. Words past the model's
        length limit get tag None."""
        tok = tokenizer_of(loaded)
        config = loaded.model.config
        names = label_names(config, config.num_labels)
        limit = getattr(config, "max_position_embeddings", None) or 512
        logits_of = forward(loaded)
        results = []
        for i in range(0, len(texts), batch):
            chunk = list(texts[i:i + batch])
            words = [t.split() or [t] for t in chunk]  # an empty text is one empty word
            enc = tok(words, is_split_into_words=True, truncation=True, max_length=limit, padding="longest",
                      return_tensors="np")
            logits = logits_of(text_inputs(tok, enc))
            for j, (text, ws) in enumerate(zip(chunk, words)):
                p_TK = softmax(logits[j])
                tags, scores, seen = [None] * len(ws), [None] * len(ws), set()
                for t, w in enumerate(enc.word_ids(j)):
                    if w is not None and w not in seen:  # the word's first sub-token
                        seen.add(w)
                        k = int(p_TK[t].argmax())
                        tags[w], scores[w] = names[k], float(p_TK[t, k])
                results.append({"input": text, "words": ws, "tags": tags, "scores": scores})
        return results

    def format(self, r: dict) -> str:
        """'John/B-PER lives/O in/O Paris/B-LOC' (a word past the length limit: word/?)"""
        return " ".join(f"{w}/{t if t is not None else '?'}" for w, t in zip(r["words"], r["tags"]))


def make(config=None) -> TokenClassification:
    return TokenClassification(
        num_labels=getattr(config, "num_labels", 2),
        problem_type=getattr(config, "problem_type", None),
    )
