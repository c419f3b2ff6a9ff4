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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.errors import JaxtuneError
from jaxtune.tasks.base import Task, confusion_sums, example_weights, macro_f1, safe_div, weighted_mean

NAME = "sequence-classification"
SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"


@dataclass(frozen=True)
class SequenceClassification(Task):
    name: str = NAME
    head: str = NAME

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

    def predict(self, logits_BK):
        """Class ids (single-label), 0/1 vectors (multi-label) or values (regression)."""
        kind = self.problem_type or (REGRESSION if self.num_labels == 1 else SINGLE)
        if kind == SINGLE:
            return logits_BK.argmax(-1)
        if kind == MULTI:
            return (logits_BK > 0).astype(jnp.int32)
        return logits_BK[..., 0] if self.num_labels == 1 else logits_BK


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
