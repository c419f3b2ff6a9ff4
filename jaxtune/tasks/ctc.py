"""CTC speech recognition: per-frame character logits from audio (Wav2Vec2 / HuBERT `...ForCTC`).

Batches (`jaxtune.data.audio`): `input_values` (B, S) float32, `attention_mask` (B, S) 1/0 over
samples, `labels` (B, N) int character ids with -100 after each transcript, `weights` (B,).
The logits (B, T, V) have T frames; a row's real frames are `config.frames(its samples)`.

Loss: `optax.ctc_loss` with the blank at the model's `pad_token_id` (as transformers' CTC loss),
per recording; `ctc_loss_reduction: mean` divides each by its transcript's length (transformers'
"mean"), `sum` keeps it whole; either way the batch loss is the mean over recordings weighted by
`weights` (not transformers' batch sum, so that the loss does not grow with the batch).
`ctc_zero_infinity` zeroes the loss of a recording whose transcript needs more frames than it has
(its length plus one blank between repeated characters), as transformers zeroes its infinite loss.

Evaluation: greedy decoding (the most likely token per frame, repeats collapsed, blanks dropped),
then word and character error rates over the whole split with `jiwer` (its counts summed over
batches: errors / reference words and errors / reference characters, as jiwer computes them over a
list of sentences). Metrics: `loss`, `wer`, `cer`.

Prediction (`jaxtune predict MODEL a.wav b.flac`): each file read, resampled and normalised as the
model's `preprocessor_config.json` says, decoded greedily with its vocabulary (`vocab.json`, else
the config's `id2label`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from jaxtune.data.audio import IGNORE, AudioSettings, CharVocab, read_audio
from jaxtune.errors import DataError, JaxtuneError
from jaxtune.tasks.base import Task, example_weights, safe_div, weighted_mean
from jaxtune.tasks.predicting import forward

NAME = "ctc"
# What a split's eval outputs carry beyond sums: per-example arrays decoded on the host.
PER_EXAMPLE = ("pred", "pred_lengths", "labels", "weights")


def jiwer():
    try:
        import jiwer as module
    except ImportError as e:
        raise JaxtuneError(f"WER and CER need jiwer: pip install 'jaxtune[audio]' ({e})") from None
    return module


def frames_of(samples, kernels: Sequence[int], strides: Sequence[int]):
    """Frames a feature encoder with these convolutions makes of `samples`."""
    for k, s in zip(kernels, strides):
        samples = (samples - k) // s + 1
    return samples


def greedy_collapse(ids: np.ndarray, length: int, blank: int) -> list[int]:
    """The CTC greedy path's tokens: repeats merged, blanks dropped, over the first `length` frames."""
    out, prev = [], None
    for t in ids[:length]:
        t = int(t)
        if t != prev and t != blank:
            out.append(t)
        prev = t
    return out


def _host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclass(frozen=True)
class CTC(Task):
    name: str = NAME
    head: str = NAME
    data_kind: ClassVar[str] = "audio"
    modality: ClassVar[str] = "audio"

    blank_id: int = 0
    vocab: Optional[tuple[str, ...]] = None  # tokens in id order (the config's id2label)
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
    reduction: str = "mean"
    zero_infinity: bool = False

    def frames(self, batch, T: int) -> jax.Array:
        """(B,) real frames of each row (all T without an attention mask)."""
        mask = batch.get("attention_mask")
        if mask is None:
            return jnp.full((batch["input_values"].shape[0],), T, jnp.int32)
        samples = jnp.sum(jnp.asarray(mask, jnp.int32), axis=-1)
        return jnp.minimum(frames_of(samples, self.conv_kernel, self.conv_stride), T).astype(jnp.int32)

    def per_example_loss(self, logits_BTV, batch):
        B, T, _ = logits_BTV.shape
        labels_BN = jnp.asarray(batch["labels"])
        frames_B = self.frames(batch, T)
        logit_pad_BT = (jnp.arange(T)[None, :] >= frames_B[:, None]).astype(jnp.float32)
        valid_BN = labels_BN != IGNORE
        label_pad_BN = 1.0 - valid_BN.astype(jnp.float32)
        loss_B = optax.ctc_loss(logits_BTV.astype(jnp.float32), logit_pad_BT, jnp.where(valid_BN, labels_BN, 0),
                                label_pad_BN, blank_id=self.blank_id)
        lengths_B = jnp.sum(valid_BN, axis=-1)
        if self.zero_infinity:  # no alignment fits: each repeat needs a blank between its two frames
            repeats_B = jnp.sum(valid_BN[:, 1:] & (labels_BN[:, 1:] == labels_BN[:, :-1]), axis=-1)
            loss_B = jnp.where(lengths_B + repeats_B > frames_B, 0.0, loss_B)
        if self.reduction == "mean":
            loss_B = loss_B / jnp.maximum(lengths_B, 1)
        return loss_B, frames_B

    def loss(self, logits_BTV, batch):
        loss_B, _ = self.per_example_loss(logits_BTV, batch)
        return weighted_mean(loss_B, example_weights(batch, logits_BTV.shape[0])), {}

    def outputs(self, logits_BTV, batch) -> dict:
        loss_B, frames_B = self.per_example_loss(logits_BTV, batch)
        w_B = example_weights(batch, logits_BTV.shape[0])
        return {"loss_sum": jnp.sum(w_B * loss_B), "weight_sum": jnp.sum(w_B),
                "pred": jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32), "pred_lengths": frames_B,
                "labels": jnp.asarray(batch["labels"], jnp.int32), "weights": w_B}

    def _token_texts(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Id sequences as strings jiwer can score: one character per id (a bijection from the
        vocabulary, so the error counts equal those of the decoded text) and a space per word
        delimiter. Without a vocabulary every id is its own character."""
        delim = self.vocab.index("|") if self.vocab and "|" in self.vocab else None
        out = []
        for ids in rows:
            s = "".join(" " if i == delim else chr(0x4E00 + int(i)) for i in ids)
            out.append(" ".join(s.split()))
        return out

    def accumulate(self, totals: Optional[dict], outputs: dict) -> dict:
        """Add one batch: the loss sums, and jiwer's word and character error counts of the
        greedy transcripts against the labels (rows of weight 0 skipped)."""
        host = {k: _host(v) for k, v in outputs.items()}
        refs, hyps = [], []
        for pred, n, labels, w in zip(*(host[k] for k in PER_EXAMPLE)):
            if w <= 0:
                continue
            refs.append([int(t) for t in labels if t != IGNORE])
            hyps.append(greedy_collapse(pred, int(n), self.blank_id))
        counts = {"loss_sum": float(host["loss_sum"]), "weight_sum": float(host["weight_sum"]),
                  "word_errors": 0.0, "words": 0.0, "char_errors": 0.0, "chars": 0.0}
        ref_t, hyp_t = self._token_texts(refs), self._token_texts(hyps)
        keep = [i for i, r in enumerate(ref_t) if r]  # jiwer refuses empty references
        if keep:
            jw = jiwer()
            r, h = [ref_t[i] for i in keep], [hyp_t[i] for i in keep]
            words = jw.process_words(r, h)
            chars = jw.process_characters(r, h)
            counts["word_errors"] = float(words.substitutions + words.deletions + words.insertions)
            counts["words"] = float(words.substitutions + words.deletions + words.hits)
            counts["char_errors"] = float(chars.substitutions + chars.deletions + chars.insertions)
            counts["chars"] = float(chars.substitutions + chars.deletions + chars.hits)
        if totals is None:
            return counts
        return {k: totals[k] + counts[k] for k in counts}

    def metrics(self, totals: dict) -> dict:
        return {"loss": safe_div(totals["loss_sum"], totals["weight_sum"]),
                "wer": safe_div(totals["word_errors"], totals["words"]),
                "cer": safe_div(totals["char_errors"], totals["chars"])}

    def metric_names(self) -> tuple[str, ...]:
        return ("loss", "wer", "cer")

    def predict(self, loaded, paths: Sequence[str], *, batch: int = 8) -> list[dict]:
        """Transcribe audio files (greedy CTC decoding)."""
        config = loaded.model.config
        folder = loaded.tokenizer_dir
        settings = AudioSettings.from_model(folder) if folder else AudioSettings()
        vocab = CharVocab.from_model(folder) if folder else None
        if vocab is None:
            tokens = tuple(config.id2label or ())
            if len(tokens) != config.vocab_size:
                raise DataError(f"{loaded.source} has no vocab.json and its config's id2label does not "
                                f"list the {config.vocab_size} tokens: nothing to decode with")
            vocab = CharVocab(tokens)
        if len(vocab.tokens) != config.vocab_size:
            raise DataError(f"{loaded.source}: vocab.json has {len(vocab.tokens)} tokens, the model "
                            f"{config.vocab_size}")
        logits_of = forward(loaded)
        results = []
        for i in range(0, len(paths), batch):
            chunk = list(paths[i:i + batch])
            audio = [read_audio(Path(p), settings) for p in chunk]
            longest = max(max(len(a) for a in audio), config.receptive_field)
            values = np.zeros((len(audio), longest), np.float32)
            mask = np.zeros((len(audio), longest), np.int32)
            for j, a in enumerate(audio):
                values[j, :len(a)], mask[j, :len(a)] = a, 1
            logits = logits_of({"input_values": values, "attention_mask": mask})
            frames = np.asarray(config.frames(mask.sum(-1)))
            for p, a, row, n in zip(chunk, audio, logits, frames):
                ids = greedy_collapse(row.argmax(-1), int(n), vocab.blank_id)
                results.append({"input": p, "transcript": vocab.decode(ids),
                                "seconds": len(a) / settings.sampling_rate})
        return results

    def format(self, r: dict) -> str:
        return f"{r['transcript']}  <- {r['input']}"


def make(config=None) -> CTC:
    if config is None:
        return CTC()
    vocab = tuple(config.id2label) if config.id2label and len(config.id2label) == config.vocab_size else None
    return CTC(num_labels=config.vocab_size, blank_id=int(config.pad_token_id or 0), vocab=vocab,
               conv_kernel=tuple(config.conv_kernel), conv_stride=tuple(config.conv_stride),
               reduction=config.ctc_loss_reduction, zero_infinity=bool(config.ctc_zero_infinity))


__all__ = ["CTC", "NAME", "frames_of", "greedy_collapse", "make"]
