"""Sequence-to-sequence LM (encoder-decoder: T5, mT5, BART, Marian): map a source text to a target
text (translation, grapheme-to-phoneme, summarisation, ...).

Batches (`jaxtune.data.seq2seq`): `input_ids`, `attention_mask` (the source), `decoder_input_ids`,
`decoder_attention_mask` (the target shifted right after the decoder start token), `labels`
(B, T) the target tokens with -100 on padding, `weights` (B,).

Training loss: the mean cross-entropy over every target token of the batch, each weighted by its
row's `weights`; with `train.label_smoothing` eps the target distribution is (1 - eps) on the
label plus eps spread evenly over the vocabulary (transformers' label smoother, optax's
`smooth_labels`).

Evaluation: teacher-forced `loss` (plain cross-entropy, no smoothing: comparable across runs) and
`token_accuracy`; then each example's target is *generated* (greedy, or beam search with
`train.eval_num_beams`, up to `data.max_target_length` tokens, inside the jitted eval step with
the KV cache) and scored against its reference, decoded with the tokenizer (special tokens
skipped): `bleu` and `chrf` (sacrebleu's corpus BLEU and chrF, 0-100), `exact_match` (the share
of generated targets equal to their reference) and `wer` (jiwer's word error rate over
whitespace-separated tokens of the decoded texts: for grapheme-to-phoneme targets written as
space-separated phonemes, the phoneme error rate).

`jaxtune predict` generates a target for each source (greedy by default; `--num-beams`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.data import load_tokenizer
from jaxtune.data.text import IGNORE
from jaxtune.errors import JaxtuneError
from jaxtune.models import merge
from jaxtune.models.seq2seq_generate import beam_search, generate, greedy_search, token_settings
from jaxtune.tasks.base import Task, add_totals, example_weights, model_inputs, safe_div, weighted_mean
from jaxtune.tasks.predicting import tokenizer_of

NAME = "seq2seq-lm"
DEFAULT_NEW_TOKENS = 64
SEQUENCE_KEYS = ("generated", "generated_lengths", "labels", "weights")


def token_terms(logits_BTV, batch, label_smoothing: float = 0.0):
    """(per-token loss (B, T), weights (B, T), correct (B, T)) over the target tokens."""
    labels_BT = batch["labels"]
    valid = labels_BT != IGNORE
    targets = jnp.where(valid, labels_BT, 0).astype(jnp.int32)
    logits = logits_BTV.astype(jnp.float32)
    if label_smoothing:
        onehot = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
        loss_BT = optax.softmax_cross_entropy(logits, onehot)
    else:
        loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    w_BT = example_weights(batch, logits.shape[0])[:, None] * valid
    return loss_BT, w_BT, (logits.argmax(-1) == targets)


@dataclass(frozen=True)
class Seq2SeqLM(Task):
    name: str = NAME
    head: str = NAME
    data_kind: ClassVar[str] = "seq2seq"
    predict_options: ClassVar[tuple[str, ...]] = ("max_new_tokens", "num_beams", "length_penalty",
                                                  "early_stopping", "prefix")
    label_smoothing: float = 0.0
    eval_num_beams: int = 1
    max_new_tokens: int = DEFAULT_NEW_TOKENS  # generated at evaluation
    tokenizer_path: Optional[str] = None  # decodes generated and reference targets for the metrics
    special: tuple = ()  # token_settings of the model config, as sorted (key, value) pairs

    def with_recipe(self, recipe) -> "Seq2SeqLM":
        """The recipe's loss and evaluation settings (train.label_smoothing, train.eval_num_beams,
        data.max_target_length, the tokenizer of model.tokenizer or model.path)."""
        d = recipe.data
        return dataclasses.replace(
            self, label_smoothing=recipe.train.label_smoothing, eval_num_beams=recipe.train.eval_num_beams,
            max_new_tokens=d.max_target_length or d.max_length,
            tokenizer_path=getattr(recipe.model, "tokenizer", None) or recipe.model.path)

    def for_loaded(self, loaded) -> "Seq2SeqLM":
        """The settings of a loaded run (its recipe's), or a model folder's tokenizer."""
        if loaded.recipe is not None:
            return self.with_recipe(loaded.recipe)
        return dataclasses.replace(self, tokenizer_path=loaded.tokenizer_dir)

    def loss(self, logits_BTV, batch):
        loss_BT, w_BT, correct_BT = token_terms(logits_BTV, batch, self.label_smoothing)
        aux = {"accuracy": weighted_mean(correct_BT.astype(jnp.float32), w_BT), "tokens": jnp.sum(w_BT > 0)}
        return weighted_mean(loss_BT, w_BT), aux

    def outputs(self, logits_BTV, batch) -> dict:
        loss_BT, w_BT, correct_BT = token_terms(logits_BTV, batch)
        out = {"loss_sum": jnp.sum(w_BT * loss_BT), "weight_sum": jnp.sum(w_BT), "correct": jnp.sum(w_BT * correct_BT)}
        return {k: v.astype(jnp.float32) for k, v in out.items()}

    def search(self, model, input_ids, attention_mask):
        """The targets the model generates for a batch (traceable): (tokens, lengths)."""
        ids = dict(self.special) or token_settings(model.config)
        if self.eval_num_beams > 1:
            tokens, lengths, _ = beam_search(model, input_ids, attention_mask, jnp.float32(1.0),
                                             max_new_tokens=self.max_new_tokens, num_beams=self.eval_num_beams,
                                             early_stopping=False, **ids)
        else:
            tokens, lengths, _ = greedy_search(model, input_ids, attention_mask, max_new_tokens=self.max_new_tokens,
                                               **ids)
        return tokens, lengths

    def eval_fn(self, graphdef, rest):
        """`eval_fn(params, batch)`: the teacher-forced sums and the generated targets."""

        def fn(params, batch):
            model = merge(graphdef, params, rest)
            out = self.outputs(model(**model_inputs(batch), deterministic=True).logits, batch)
            tokens, lengths = self.search(model, batch["input_ids"], batch["attention_mask"])
            return {**out, "generated": tokens, "generated_lengths": lengths, "labels": batch["labels"],
                    "weights": example_weights(batch, tokens.shape[0])}

        return fn

    def accumulate(self, totals: Optional[dict], outputs: dict) -> dict:
        """Add one batch: the teacher-forced sums, and the decoded generated and reference targets
        of its examples (rows of weight 0 skipped)."""
        host = {k: np.asarray(jax.device_get(v)) for k, v in outputs.items()}
        sums = {k: v for k, v in host.items() if k not in SEQUENCE_KEYS}
        hyps, refs = self.texts(host)
        if totals is None:
            return {"sums": add_totals(None, sums), "hyps": hyps, "refs": refs}
        return {"sums": add_totals(totals["sums"], sums), "hyps": totals["hyps"] + hyps,
                "refs": totals["refs"] + refs}

    def texts(self, host: dict) -> tuple[list[str], list[str]]:
        """(generated, reference) target texts of a batch's examples of weight > 0: decoded with
        the tokenizer (special tokens skipped), or token ids joined by spaces without one."""
        tok = _tokenizer(self.tokenizer_path) if self.tokenizer_path else None
        eos = set(dict(self.special).get("eos", ()))
        hyps, refs = [], []
        for row in range(len(host["weights"])):
            if host["weights"][row] <= 0:
                continue
            gen = [int(t) for t in host["generated"][row, :host["generated_lengths"][row]] if int(t) not in eos]
            ref = [int(t) for t in host["labels"][row] if t != IGNORE and int(t) not in eos]
            if tok is None:
                hyps.append(" ".join(map(str, gen)))
                refs.append(" ".join(map(str, ref)))
            else:
                hyps.append(tok.decode(gen, skip_special_tokens=True).strip())
                refs.append(tok.decode(ref, skip_special_tokens=True).strip())
        return hyps, refs

    def metrics(self, totals: dict) -> dict:
        """Teacher-forced loss and token accuracy; with generated targets (what `accumulate`
        collects) BLEU, chrF, exact match and WER too."""
        sums = totals.get("sums", totals)
        out = {"loss": safe_div(sums["loss_sum"], sums["weight_sum"]),
               "token_accuracy": safe_div(sums["correct"], sums["weight_sum"]), "tokens": float(sums["weight_sum"])}
        if "hyps" in totals:
            out.update(sequence_scores(totals["hyps"], totals["refs"]))
        return out

    def metric_names(self) -> tuple[str, ...]:
        return ("loss", "token_accuracy", "tokens", "bleu", "chrf", "exact_match", "wer")

    def predict(self, loaded, sources: Sequence[str], *, max_new_tokens: Optional[int] = None, num_beams: int = 1,
                length_penalty: float = 1.0, early_stopping=False, prefix: Optional[str] = None) -> list[dict]:
        """Generate a target for each source (one batch). `prefix`: None uses the run's
        data.source_prefix (none for a model folder). Returns per source: input, generated
        (decoded, special tokens skipped), tokens (new ids, EOS included)."""
        tok = tokenizer_of(loaded)
        if prefix is None:
            prefix = getattr(getattr(loaded.recipe, "data", None), "source_prefix", "") or ""
        enc = tok([prefix + s for s in sources], padding="longest", return_tensors="np")
        if max_new_tokens is None:
            d = getattr(loaded.recipe, "data", None)
            max_new_tokens = (getattr(d, "max_target_length", None) or getattr(d, "max_length", None)
                              or DEFAULT_NEW_TOKENS)
        out = generate(loaded.model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                       num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
        results = []
        for i, s in enumerate(sources):
            new = [int(t) for t in out.tokens[i, :out.lengths[i]]]
            results.append({"input": s, "generated": tok.decode(new, skip_special_tokens=True).strip(),
                            "tokens": new})
        return results

    def format(self, r: dict) -> str:
        """'"hello" -> "HH AH0 L OW1"' (both JSON-quoted)."""
        return f"{json.dumps(r['input'], ensure_ascii=False)} -> {json.dumps(r['generated'], ensure_ascii=False)}"


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    return load_tokenizer(path)


def sequence_scores(hyps: list[str], refs: list[str]) -> dict:
    """BLEU and chrF (sacrebleu, corpus level, 0-100), exact match (share of hyps equal to their
    reference) and WER (jiwer, whitespace tokens; references with no token are left out of it)."""
    try:
        import jiwer
        import sacrebleu
    except ImportError as e:  # optional dependencies: the `seq2seq` extra
        raise JaxtuneError(f"seq2seq-lm evaluation needs sacrebleu and jiwer (pip install 'jaxtune[seq2seq]'): {e}")
    if not refs:
        return {"bleu": 0.0, "chrf": 0.0, "exact_match": 0.0, "wer": 0.0}
    scored = [(h, r) for h, r in zip(hyps, refs) if r.split()]
    return {
        "bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
        "chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score),
        "exact_match": float(np.mean([h == r for h, r in zip(hyps, refs)])),
        "wer": float(jiwer.wer([r for _, r in scored], [h for h, _ in scored])) if scored else 0.0,
    }


def make(config=None) -> Seq2SeqLM:
    """The task for a model config (its special token ids drive generation at evaluation)."""
    special = ()
    if config is not None and hasattr(config, "decoder_start_token_id"):
        special = tuple(sorted(token_settings(config).items()))
    return Seq2SeqLM(num_labels=0, special=special)


__all__ = ["NAME", "SEQUENCE_KEYS", "Seq2SeqLM", "make", "sequence_scores", "token_terms"]
