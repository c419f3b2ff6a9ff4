"""What every task shares: the Task record, weighted sums and metric formulas.

A task turns logits and a batch into (a) a training loss and (b) eval *outputs*: sums that add up
over batches (weighted loss, weight, correct counts, per-class tp/fp/fn), so that metrics over a
whole split are exact: no dropped remainder, and padding examples (weight 0) never count.
`Task.metrics(totals)` turns the summed outputs of a split into numbers. A task also says what
data it reads (`data_kind`, `modality`), which metrics it reports (`metric_names`, known before
any data is seen), and how a trained model predicts from raw inputs (`predict`, `format`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Batch keys a model takes as inputs; everything else (labels, weights, ids) stays out.
# segment_ids: packed causal-LM rows (which example each token belongs to; see tasks/causal_lm.py).
# decoder_input_ids / decoder_attention_mask: an encoder-decoder's target side (tasks/seq2seq_lm.py).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "segment_ids",
                "decoder_input_ids", "decoder_attention_mask",
                "pixel_values", "input_values")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def example_weights(batch: dict, batch_size: int) -> jax.Array:
    """(B,) float32 weights; all ones when the batch has none."""
    w = batch.get("weights")
    if w is None:
        return jnp.ones((batch_size,), jnp.float32)
    return jnp.asarray(w, jnp.float32)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(w * v) / sum(w); 0 when every weight is 0 (an all-padding batch)."""
    total = jnp.sum(weights)
    return jnp.where(total > 0, jnp.sum(weights * values) / jnp.where(total > 0, total, 1.0), 0.0)


def confusion_sums(pred, label, weights, num_classes: int) -> dict:
    """Weighted per-class true positives, false positives and false negatives, each (K,)."""
    p = jax.nn.one_hot(pred, num_classes, dtype=jnp.float32)
    t = jax.nn.one_hot(label, num_classes, dtype=jnp.float32)
    w = weights[..., None]
    return {
        "tp": jnp.sum(w * p * t, axis=tuple(range(p.ndim - 1))),
        "fp": jnp.sum(w * p * (1 - t), axis=tuple(range(p.ndim - 1))),
        "fn": jnp.sum(w * (1 - p) * t, axis=tuple(range(p.ndim - 1))),
    }


def safe_div(a, b) -> float:
    return float(a / b) if b > 0 else 0.0


def macro_f1(tp, fp, fn, *, present_only: bool) -> float:
    """Mean F1 over classes. `present_only`: only classes seen as label or prediction (as
    sklearn's multi-class macro-F1 does); else all classes, 0 for empty ones (sklearn multi-label)."""
    tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    if present_only:
        f1 = f1[denom > 0]
    return float(f1.mean()) if f1.size else 0.0


@dataclass(frozen=True)
class Task:
    """A task for one model config. Subclasses implement every method below."""

    name: str = ""
    num_labels: int = 2
    problem_type: Optional[str] = None

    # Which head `from_pretrained(task=...)` builds for this task.
    head: str = ""

    # The examples the data pipeline reads for it (`jaxtune.data.schema`): 'text', 'tokens', 'lm',
    # 'image', 'audio'.
    data_kind: ClassVar[str] = ""
    # What a model folder must supply to read raw inputs: 'text' (a tokenizer), 'image' (image
    # preprocessing settings) or 'audio' (a feature extractor's settings and a CTC vocabulary).
    modality: ClassVar[str] = "text"
    # Keyword options `predict` takes beyond (loaded, inputs), e.g. generation settings.
    predict_options: ClassVar[tuple[str, ...]] = ()

    def loss(self, logits, batch) -> tuple[jax.Array, dict]:
        raise NotImplementedError

    def outputs(self, logits, batch) -> dict:
        raise NotImplementedError

    def metrics(self, totals: dict) -> dict:
        raise NotImplementedError

    def accumulate(self, totals: Optional[dict], outputs: dict) -> dict:
        """Add one batch's eval `outputs` to the running `totals` (host side): sums by default; a
        task whose metrics need more than sums (CTC's WER from decoded text) overrides it."""
        return add_totals(totals, outputs)

    def metric_names(self) -> tuple[str, ...]:
        """The keys `metrics` returns for this config, in the same order."""
        raise NotImplementedError

    def predict(self, loaded, inputs: Sequence[str], **options) -> list[dict]:
        """One result dict per raw input (text, prompt or image path) for a loaded model
        (`jaxtune.inference.Loaded`: `.model`, `.tokenizer_dir`, `.source`)."""
        raise NotImplementedError

    def format(self, result: dict) -> str:
        """One console line for a `predict` result."""
        raise NotImplementedError


def add_totals(totals: Optional[dict], outputs: dict) -> dict:
    """Running float64 sums of eval outputs (host side)."""
    outputs = {k: np.asarray(jax.device_get(v), np.float64) for k, v in outputs.items()}
    if totals is None:
        return outputs
    return {k: totals[k] + outputs[k] for k in totals}
