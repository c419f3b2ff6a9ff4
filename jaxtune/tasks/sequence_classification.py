"""Sequence classification: one label (or label vector, or value) per example.

Loss by HF `problem_type`, as transformers' `...ForSequenceClassification` computes it:

- `single_label_classification`: cross-entropy; labels (B,) int.
- `multi_label_classification`: sigmoid binary cross-entropy, mean over the K labels; labels (B, K)
  float 0/1.
- `regression`: mean squared error; labels (B,) float (num_labels 1) or (B, K).

When the config leaves `problem_type` unset it is inferred as transformers does: num_labels 1 ->
regression, integer labels -> single-label, otherwise multi-label. Every loss is a mean over
examples weighted by `batch['weights']`.

Metrics over a split: `loss`; single-label `accuracy`, `macro_f1` (over classes that occur as label
or prediction, like sklearn); multi-label `accuracy` (exact match), `label_accuracy`, `macro_f1`
(over all labels, threshold logit > 0); regression `mse`, `mae` and (num_labels 1) `pearson`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.errors import JaxtuneError
from jaxtune.tasks.base import Task, confusion_sums, example_weights, macro_f1, safe_div, weighted_mean
from jaxtune.tasks.predicting import forward, label_names, softmax, text_inputs, tokenizer_of

NAME = "sequence-classification"
SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"


@dataclass(frozen=True)
class SequenceClassification(Task):
    name: str = NAME
    head: str = NAME
    data_kind: ClassVar[str] = "text"

    def kind(self, labels) -> str:
        """The problem type; inferred from num_labels and the labels' dtype when unset."""
        if self.problem_type:
            if self.problem_type not in (SINGLE, MULTI, REGRESSION):
                raise JaxtuneError(
                    f"problem_type '{self.problem_type}' is not one of {SINGLE}, {MULTI}, {REGRESSION}"
                )
            return self.problem_type
        if self.num_labels == 1:
            return REGRESSION
        return SINGLE if jnp.issubdtype(labels.dtype, jnp.integer) else MULTI

    def per_example_loss(self, logits_BK, labels, kind: str) -> jax.Array:
        if kind == SINGLE:
            return optax.softmax_cross_entropy_with_integer_labels(logits_BK, labels.astype(jnp.int32))
        if kind == MULTI:
            return optax.sigmoid_binary_cross_entropy(logits_BK, labels.astype(jnp.float32)).mean(-1)
        pred, target = _regression_pair(logits_BK, labels)
        return jnp.square(pred - target).reshape(pred.shape[0], -1).mean(-1)

    def loss(self, logits_BK, batch):
        labels = batch["labels"]
        kind = self.kind(labels)
        w_B = example_weights(batch, logits_BK.shape[0])
        loss = weighted_mean(self.per_example_loss(logits_BK, labels, kind), w_B)
        aux = {}
        if kind == SINGLE:
            aux["accuracy"] = weighted_mean((logits_BK.argmax(-1) == labels).astype(jnp.float32), w_B)
        return loss, aux

    def outputs(self, logits_BK, batch) -> dict:
        labels = batch["labels"]
        kind = self.kind(labels)
        w_B = example_weights(batch, logits_BK.shape[0])
        out = {
            "loss_sum": jnp.sum(w_B * self.per_example_loss(logits_BK, labels, kind)),
            "weight_sum": jnp.sum(w_B),
        }
        if kind == SINGLE:
            pred = logits_BK.argmax(-1)
            out["correct"] = jnp.sum(w_B * (pred == labels))
            out.update(confusion_sums(pred, labels, w_B, logits_BK.shape[-1]))
        elif kind == MULTI:
            pred_BK = logits_BK > 0
            true_BK = labels > 0.5
            w_BK = w_B[:, None]
            out["exact"] = jnp.sum(w_B * jnp.all(pred_BK == true_BK, axis=-1))
            out["label_correct"] = jnp.sum(w_B * jnp.mean(pred_BK == true_BK, axis=-1))
            out["tp"] = jnp.sum(w_BK * (pred_BK & true_BK), axis=0)
            out["fp"] = jnp.sum(w_BK * (pred_BK & ~true_BK), axis=0)
            out["fn"] = jnp.sum(w_BK * (~pred_BK & true_BK), axis=0)
        else:
            pred, target = _regression_pair(logits_BK, labels)
            err = (pred - target).reshape(pred.shape[0], -1)
            out["abs_sum"] = jnp.sum(w_B * jnp.abs(err).mean(-1))
            if pred.ndim == 1:  # one value per example: sums for Pearson's r
                out.update(sx=jnp.sum(w_B * pred), sy=jnp.sum(w_B * target),
                           sxx=jnp.sum(w_B * pred * pred), syy=jnp.sum(w_B * target * target),
                           sxy=jnp.sum(w_B * pred * target))
        return {k: v.astype(jnp.float32) for k, v in out.items()}

    def metrics(self, totals: dict) -> dict:
        n = totals["weight_sum"]
        m = {"loss": safe_div(totals["loss_sum"], n)}
        if "correct" in totals:
            m["accuracy"] = safe_div(totals["correct"], n)
            m["macro_f1"] = macro_f1(totals["tp"], totals["fp"], totals["fn"], present_only=True)
        elif "exact" in totals:
            m["accuracy"] = safe_div(totals["exact"], n)
            m["label_accuracy"] = safe_div(totals["label_correct"], n)
            m["macro_f1"] = macro_f1(totals["tp"], totals["fp"], totals["fn"], present_only=False)
        else:
            m["mse"] = m["loss"]
            m["mae"] = safe_div(totals["abs_sum"], n)
            if "sxy" in totals and n > 0:
                cov = totals["sxy"] / n - totals["sx"] * totals["sy"] / n**2
                vx = totals["sxx"] / n - (totals["sx"] / n) ** 2
                vy = totals["syy"] / n - (totals["sy"] / n) ** 2
                m["pearson"] = float(cov / np.sqrt(vx * vy)) if vx > 0 and vy > 0 else 0.0
        return m

    def kind_of_config(self) -> str:
        """The problem type before any labels are seen (unset: regression for one label, else
        single-label, as transformers decides)."""
        return self.problem_type or (REGRESSION if self.num_labels == 1 else SINGLE)

    def metric_names(self) -> tuple[str, ...]:
        kind = self.kind_of_config()
        if kind == SINGLE:
            return ("loss", "accuracy", "macro_f1")
        if kind == MULTI:
            return ("loss", "accuracy", "label_accuracy", "macro_f1")
        return ("loss", "mse", "mae") + (("pearson",) if self.num_labels == 1 else ())

    def scores(self, config, logits_BK: np.ndarray) -> list[dict]:
        """Per example: label and probabilities (single-label), labels over 0.5 (multi-label) or
        value (regression)."""
        names = label_names(config, logits_BK.shape[-1])
        kind = self.kind_of_config()
        out = []
        for row in logits_BK:
            if kind == REGRESSION:
                out.append({"value": float(row[0]) if row.shape[-1] == 1 else row.tolist()})
            elif kind == MULTI:
                p = 1 / (1 + np.exp(-row))
                out.append({"labels": [n for n, q in zip(names, p) if q > 0.5],
                            "probabilities": dict(sorted(zip(names, p.tolist()), key=lambda t: -t[1]))})
            else:
                p = softmax(row)
                order = np.argsort(-p)
                out.append({"label": names[order[0]], "probabilities": {names[i]: float(p[i]) for i in order}})
        return out

    def predict(self, loaded, texts: Sequence[str], *, max_length: int = 512, batch: int = 32) -> list[dict]:
        """Classify raw texts, tokenized with the model folder's tokenizer."""
        tok = tokenizer_of(loaded)
        limit = getattr(loaded.model.config, "max_position_embeddings", None) or max_length
        logits_of = forward(loaded)
        results = []
        for i in range(0, len(texts), batch):
            chunk = list(texts[i:i + batch])
            enc = tok(chunk, truncation=True, max_length=min(max_length, limit), padding="longest",
                      return_tensors="np")
            logits = logits_of(text_inputs(tok, enc))
            results += [{"input": t, **s} for t, s in zip(chunk, self.scores(loaded.model.config, logits))]
        return results

    def format(self, r: dict, top: int = 3) -> str:
        """'positive 0.912 (neutral 0.061, negative 0.027)  <- input'"""
        if "label" in r:
            probs = list(r["probabilities"].items())
            rest = ", ".join(f"{n} {p:.3f}" for n, p in probs[1:top])
            head = f"{probs[0][0]} {probs[0][1]:.3f}" + (f" ({rest})" if rest else "")
        elif "labels" in r:
            head = "[" + ", ".join(r["labels"]) + "]"
        else:
            head = f"{r['value']}"
        return f"{head}  <- {r['input']}"


def _regression_pair(logits_BK, labels):
    """HF squeezes both sides when num_labels is 1."""
    labels = labels.astype(jnp.float32)
    if logits_BK.shape[-1] == 1:
        return logits_BK[..., 0], labels.reshape(logits_BK.shape[0])
    return logits_BK, labels


def make(config=None) -> SequenceClassification:
    return SequenceClassification(
        num_labels=getattr(config, "num_labels", 2),
        problem_type=getattr(config, "problem_type", None),
    )
