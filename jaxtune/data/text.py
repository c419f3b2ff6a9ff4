"""Text examples -> padded numpy batches, with a Hugging Face fast tokenizer.

Each batch is padded (right side) to the smallest *bucket* length that holds its longest
sequence, so a jitted step sees at most len(buckets) shapes. Buckets are `data.buckets` or powers
of two from 16 up to `data.max_length`, plus max_length itself. Sequences are truncated to
max_length.

Outputs by kind (B examples, T = bucket length):
- text:   input_ids, attention_mask, [token_type_ids] int32 (B, T); labels int32 (B,)
          (single label), float32 (B, K) multi-hot (multi-label) or float32 (B,) (regression)
- tokens: the same inputs; labels int32 (B, T): the word's tag on the first sub-token of each
          word, -100 on later sub-tokens, special tokens and padding
- lm:     input_ids, attention_mask; labels int32 (B, T) = input_ids, -100 on prompt tokens (when
          prompt/response columns are given) and padding. No shift: the loss shifts.
          Rows rendered with a chat template (`text` + `spans`, `jaxtune.data.chat`) are tokenized
          as rendered (the template adds any BOS itself); labels are the tokens overlapping the
          spans (the assistant replies, each through its end-of-turn marker), -100 elsewhere.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from transformers import AutoTokenizer

from jaxtune.errors import DataError, ModelLoadError
from jaxtune.models.hf import VOCABULARY_FILES, resolve_model_dir
from jaxtune.models.gguf import is_gguf, load_tokenizer as gguf_tokenizer
from jaxtune.paths import resolve_path

IGNORE = -100


def make_buckets(max_length: int, buckets: Optional[Sequence[int]] = None) -> tuple[int, ...]:
    """
    >>> make_buckets(64)
    (16, 32, 64)
    >>> make_buckets(100)
    (16, 32, 64, 100)
    >>> make_buckets(128, [48, 96])
    (48, 96, 128)
    """
    if max_length < 1:
        raise DataError(f"data.max_length must be positive, got {max_length}")
    if buckets:
        bad = [b for b in buckets if b < 1 or b > max_length]
        if bad:
            raise DataError(f"data.buckets: {bad} outside 1..data.max_length ({max_length})")
        out = set(buckets)
    else:
        out, b = set(), 16
        while b < max_length:
            out.add(b)
            b *= 2
    out.add(max_length)
    return tuple(sorted(out))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


def load_tokenizer(path: str):
    """The fast tokenizer of a model folder (path may be pkg:PACKAGE/path or a cached hub id),
    offline. The folder must hold a vocabulary (tokenizer.json, vocab.txt, ...): from config.json
    alone transformers would build an empty tokenizer that reads every word as [UNK]. A `.gguf`
    file's tokenizer comes from its metadata (`jaxtune.models.gguf.load_tokenizer`)."""
    if is_gguf(path):
        return gguf_tokenizer(resolve_model_dir(path))
    folder = resolve_path(path)
    if not folder.is_dir():  # a hub id in the HF cache, or a one-line error naming the path
        folder = resolve_model_dir(path)
    if not any((folder / f).is_file() for f in VOCABULARY_FILES):
        raise ModelLoadError(
            f"{folder}: no tokenizer files (looked for {', '.join(VOCABULARY_FILES)}); a text task "
            "needs the model's tokenizer: copy its files into the folder"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # OSError, ValueError, the tokenizers library's bare Exception
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot load a tokenizer from {folder}: {first}") from None
    return tok


def token_labels(ids, offsets, spans) -> list[int]:
    """Labels for tokens `ids` with character `offsets`: the id where a token overlaps one of the
    character `spans` ([start, end, start, end, ...]), IGNORE elsewhere.

    >>> token_labels([5, 6, 7, 8], [(0, 3), (3, 5), (5, 9), (9, 10)], [4, 9])
    [-100, 6, 7, -100]
    """
    pairs = list(zip(spans[0::2], spans[1::2]))
    return [int(t) if any(s < b and e > a for a, b in pairs) else IGNORE for t, (s, e) in zip(ids, offsets)]


def _pad_id(tok) -> int:
    for v in (tok.pad_token_id, tok.eos_token_id, 0):
        if v is not None:
            return int(v)
    return 0


class TextEncoder:
    """Tokenizes canonical examples and pads them into one batch. Picklable (Grain workers)."""

    def __init__(self, tokenizer, kind: str, max_length: int, buckets: Sequence[int], *,
                 problem_type: Optional[str] = None, num_labels: Optional[int] = None):
        if tokenizer is None:
            raise DataError("a text task needs a tokenizer (the model folder's tokenizer.json)")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer; jaxtune needs tokenizer.json")
        self.tok = tokenizer
        self.kind = kind
        self.max_length = max_length
        self.buckets = tuple(buckets)
        self.problem_type = problem_type
        self.num_labels = num_labels
        self.pad_id = _pad_id(tokenizer)
        self.type_ids = "token_type_ids" in getattr(tokenizer, "model_input_names", ())

    # Encode: examples -> per-example lists (ids, type ids, token labels or None)
    def encode(self, examples: Sequence[dict]) -> list[tuple]:
        if self.kind == "text":
            texts = [e["text"] for e in examples]
            pairs = [e["text_pair"] for e in examples] if "text_pair" in examples[0] else None
            enc = self.tok(texts, pairs, truncation=True, max_length=self.max_length)
            tt = enc.get("token_type_ids") if self.type_ids else None
            return [(ids, tt[i] if tt else None, None) for i, ids in enumerate(enc["input_ids"])]
        if self.kind == "tokens":
            enc = self.tok([e["tokens"] for e in examples], is_split_into_words=True,
                           truncation=True, max_length=self.max_length)
            tt = enc.get("token_type_ids") if self.type_ids else None
            out = []
            for i, (ids, e) in enumerate(zip(enc["input_ids"], examples)):
                labels, prev = [], None
                for w in enc.word_ids(i):
                    labels.append(IGNORE if w is None or w == prev else int(e["tags"][w]))
                    prev = w
                out.append((ids, tt[i] if tt else None, labels))
            return out
        if examples and "spans" in examples[0]:
            return self._chat(examples)
        return [self._lm(e) for e in examples]

    def _chat(self, examples: Sequence[dict]) -> list[tuple]:
        enc = self.tok([e["text"] for e in examples], add_special_tokens=False, truncation=True,
                       max_length=self.max_length, return_offsets_mapping=True)
        return [(ids, None, token_labels(ids, enc["offset_mapping"][i], e["spans"]))
                for i, (ids, e) in enumerate(zip(enc["input_ids"], examples))]

    def _lm(self, e: dict) -> tuple:
        eos = self.tok.eos_token_id
        if e.get("prompt"):
            prompt = self.tok(e["prompt"])["input_ids"]  # with the tokenizer's BOS, if any
            response = self.tok(e["response"], add_special_tokens=False)["input_ids"]
        else:  # plain text, or a pair with an empty prompt: loss on every token
            prompt, response = [], self.tok(e.get("text", e.get("response")))["input_ids"]
        if eos is not None and (not response or response[-1] != eos):
            response = response + [eos]  # teach the model to stop
        ids = (prompt + response)[: self.max_length]
        labels = ([IGNORE] * len(prompt) + response)[: self.max_length]
        return ids, None, labels

    def bucket(self, encoded: Sequence[tuple]) -> int:
        return bucket_for(max(len(e[0]) for e in encoded), self.buckets)

    def collate(self, encoded: Sequence[tuple], examples: Sequence[dict], length: int) -> dict[str, np.ndarray]:
        B = len(encoded)
        ids = np.full((B, length), self.pad_id, np.int32)
        mask = np.zeros((B, length), np.int32)
        tt = np.zeros((B, length), np.int32) if self.type_ids and self.kind != "lm" else None
        tok_labels = np.full((B, length), IGNORE, np.int32) if self.kind != "text" else None
        for i, (x, t, lab) in enumerate(encoded):
            n = len(x)
            ids[i, :n] = x
            mask[i, :n] = 1
            if tt is not None and t is not None:
                tt[i, :n] = t
            if tok_labels is not None:
                tok_labels[i, :n] = lab
        out = {"input_ids": ids, "attention_mask": mask}
        if tt is not None:
            out["token_type_ids"] = tt
        out["labels"] = tok_labels if tok_labels is not None else self._seq_labels(examples)
        return out

    def _seq_labels(self, examples: Sequence[dict]) -> np.ndarray:
        if self.problem_type == "regression":
            return np.array([e["label"] for e in examples], np.float32)
        if self.problem_type == "multi_label_classification":
            hot = np.zeros((len(examples), self.num_labels), np.float32)
            for i, e in enumerate(examples):
                hot[i, np.asarray(e["label"], np.int64)] = 1.0
            return hot
        return np.array([e["label"] for e in examples], np.int32)
