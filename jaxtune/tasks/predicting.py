"""What the tasks' `predict` share: a jitted forward pass and the loaded model's tokenizer."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from jaxtune.data import load_tokenizer
from jaxtune.errors import DataError
from jaxtune.models import merge, split
from jaxtune.tasks.base import model_inputs

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def forward(loaded) -> Callable[[dict], np.ndarray]:
    """A jitted `batch -> logits` (float64 numpy) for the loaded model (one compile per shape)."""
    graphdef, params, rest = split(loaded.model)

    @jax.jit
    def logits(params, batch):
        return merge(graphdef, params, rest)(**model_inputs(batch), deterministic=True).logits

    return lambda batch: np.asarray(logits(params, batch), np.float64)


def tokenizer_of(loaded):
    """The tokenizer of the loaded model's folder; a one-line error when it has none."""
    if not loaded.tokenizer_dir:
        raise DataError(f"{loaded.source} has no tokenizer to read texts with")
    return load_tokenizer(loaded.tokenizer_dir)


def text_inputs(tok, encoded) -> dict:
    """The int32 model inputs of a tokenizer's numpy output (those the tokenizer produces)."""
    keys = [k for k in TEXT_INPUTS if k in tok.model_input_names]
    return {k: np.asarray(encoded[k], np.int32) for k in keys if k in encoded}


def label_names(config, num_classes: int) -> list[str]:
    return [str(n) for n in (config.id2label or [f"LABEL_{i}" for i in range(num_classes)])]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


__all__ = ["forward", "label_names", "softmax", "text_inputs", "tokenizer_of"]
