"""Source/target pairs -> padded numpy batches for encoder-decoder models (task seq2seq-lm).

Examples are canonical `{"source": str, "target": str}` rows (`data.source_column` /
`data.target_column` of any local format, see `jaxtune.data.schema`). The source, after
`data.source_prefix` (T5's "translate English to German: "), and the target are each tokenized
with the model's tokenizer and its special tokens (T5 and Marian end both with </s>; BART wraps
them in <s> ... </s>), truncated to `data.max_length` and `data.max_target_length`, and each side
is padded to its own bucket (the smallest of its bucket lengths that holds the batch's longest),
so a jitted step sees at most (source buckets) x (target buckets) shapes.

A batch (B examples, U source bucket, T target bucket), all int32:

    input_ids, attention_mask                 (B, U) right-padded with the tokenizer's pad id
    labels                                    (B, T) the target tokens, -100 on padding
    decoder_input_ids, decoder_attention_mask (B, T) the labels shifted right after the model's
                                              decoder_start_token_id (transformers'
                                              shift_tokens_right; padding -> pad id, mask 0)
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jaxtune.data.text import IGNORE, _pad_id, bucket_for
from jaxtune.errors import DataError


class Seq2SeqEncoder:
    """Tokenizes source/target pairs and pads each side to its bucket. Picklable (Grain workers)."""

    def __init__(self, tokenizer, max_length: int, max_target_length: int, buckets: Sequence[int],
                 target_buckets: Sequence[int], *, decoder_start_token_id: Optional[int], prefix: str = ""):
        if tokenizer is None:
            raise DataError("seq2seq-lm needs a tokenizer (the model folder's tokenizer.json, or model.tokenizer)")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer; jaxtune needs tokenizer.json")
        if decoder_start_token_id is None:
            raise DataError("seq2seq-lm: the model config has no decoder_start_token_id (set it in model.config)")
        self.tok = tokenizer
        self.max_length, self.max_target_length = max_length, max_target_length
        self.buckets, self.target_buckets = tuple(buckets), tuple(target_buckets)
        self.start = int(decoder_start_token_id)
        self.prefix = prefix
        self.pad_id = _pad_id(tokenizer)

    def encode(self, examples: Sequence[dict]) -> list[tuple]:
        """(source ids, target ids) per example."""
        src = self.tok([self.prefix + e["source"] for e in examples], truncation=True, max_length=self.max_length)
        tgt = self.tok([e["target"] for e in examples], truncation=True, max_length=self.max_target_length)
        return list(zip(src["input_ids"], tgt["input_ids"]))

    def bucket(self, encoded: Sequence[tuple]) -> tuple[int, int]:
        return (bucket_for(max(len(s) for s, _ in encoded), self.buckets),
                bucket_for(max(len(t) for _, t in encoded), self.target_buckets))

    def collate(self, encoded: Sequence[tuple], examples: Sequence[dict], length: tuple[int, int]) -> dict:
        U, T = length
        B = len(encoded)
        ids = np.full((B, U), self.pad_id, np.int32)
        mask = np.zeros((B, U), np.int32)
        labels = np.full((B, T), IGNORE, np.int32)
        for i, (s, t) in enumerate(encoded):
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
            labels[i, :len(t)] = t
        target_mask = (labels != IGNORE).astype(np.int32)
        dec = np.concatenate([np.full((B, 1), self.start, np.int32), labels[:, :-1]], axis=1)
        dec_mask = np.concatenate([np.ones((B, 1), np.int32), target_mask[:, :-1]], axis=1)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "decoder_input_ids": np.where(dec_mask == 1, dec, self.pad_id).astype(np.int32),
                "decoder_attention_mask": dec_mask}


__all__ = ["Seq2SeqEncoder"]
