"""`jaxtune verify`: run one padded random batch through jaxtune and transformers (PyTorch).

Token-level outputs (last_hidden_state, token / MLM logits) are compared on non-padded positions
only: what a model computes for padding is never used and differs between implementations.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
import transformers

from jaxtune.errors import ModelLoadError
from jaxtune.models import hf
from jaxtune.models.pretrained import _resolve_task, from_pretrained, get_family

# jaxtune task -> the transformers Auto class that loads the same head.
HF_AUTO_CLASSES = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
    "ctc": "AutoModelForCTC",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}
# Tasks with one output per example (compared in full); the others are per token.
EXAMPLE_LEVEL = ("sequence-classification", "image-classification")



def first_line(e: Exception) -> str:
    """An exception as one line: its first non-blank line (some start with a newline), else its type."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)

def random_batch(config, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with right padding (row i keeps seq - i * seq // (2 * batch) tokens);
    for image models (a config with `num_channels`), random pixel_values (B, C, H, W); for speech
    models (a config with `receptive_field`), random input_values (B, seq samples, at least two
    receptive fields), right-padded with zeros the same way."""
    rng = np.random.default_rng(seed)
    if hasattr(config, "num_channels") and hasattr(config, "image_hw"):
        shape = (batch, config.num_channels, *config.image_hw)
        return {"pixel_values": rng.normal(size=shape).astype(np.float32)}
    if hasattr(config, "receptive_field"):
        seq = max(seq, 2 * config.receptive_field)
        lengths = [max(config.receptive_field, seq - i * seq // (2 * batch)) for i in range(batch)]
        mask = (np.arange(seq)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
        return {"input_values": (rng.normal(size=(batch, seq)) * mask).astype(np.float32), "attention_mask": mask}
    pad = getattr(config, "pad_token_id", 0) or 0
    ids = rng.integers(0, config.vocab_size, (batch, seq))
    ids = np.where(ids == pad, (pad + 1) % config.vocab_size, ids)  # real tokens are never pad
    lengths = [max(1, seq - i * seq // (2 * batch)) for i in range(batch)]
    mask = (np.arange(seq)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    out = {"input_ids": np.where(mask == 1, ids, pad).astype(np.int64), "attention_mask": mask}
    if getattr(config, "type_vocab_size", 1) > 1:
        out["token_type_ids"] = (rng.integers(0, config.type_vocab_size, (batch, seq)) * mask).astype(np.int64)
    return out


def max_abs_diffs(ours, theirs, mask: Optional[np.ndarray], task: str) -> dict[str, float]:
    """{output name: max |ours - theirs|}; `theirs` is a transformers ModelOutput. `mask` None:
    every position counts (image models). Heads are compared on their last `hidden_states` entry
    (as transformers defines it: ViT's is before the final layernorm)."""
    keep = Ellipsis if mask is None else mask.astype(bool)
    diffs = {}
    if task != "base":
        a, b = np.asarray(ours.logits, np.float64), theirs.logits.detach().double().numpy()
        if task in EXAMPLE_LEVEL:
            diffs["logits"] = float(np.abs(a - b).max())
        else:
            diffs["logits"] = float(np.abs(a[keep] - b[keep]).max())
    hidden = theirs.hidden_states[-1] if task != "base" else theirs.last_hidden_state
    mine = ours.hidden_states[-1] if task != "base" and ours.hidden_states else ours.last_hidden_state
    a, b = np.asarray(mine, np.float64), hidden.detach().double().numpy()
    diffs["last_hidden_state"] = float(np.abs(a[keep] - b[keep]).max())
    if ours.pooler_output is not None and getattr(theirs, "pooler_output", None) is not None:
        a, b = np.asarray(ours.pooler_output, np.float64), theirs.pooler_output.detach().double().numpy()
        diffs["pooler_output"] = float(np.abs(a - b).max())
    return diffs


def verify(model_dir: str | os.PathLike, task: Optional[str] = None, *, batch: int = 2, seq: int = 16,
           seed: int = 0) -> tuple[str, dict[str, float]]:
    """Load `model_dir` in both libraries, run one batch; returns (task, {output: max abs diff})."""
    try:
        import torch  # optional: only verify needs it
    except ImportError as e:
        raise ModelLoadError(f"verify needs PyTorch to compare against ({e})")

    folder = hf.resolve_model_dir(model_dir)
    family = get_family(hf.read_config(folder).get("model_type"))
    task = _resolve_task(family, hf.read_config(folder), task)
    if task not in HF_AUTO_CLASSES:
        raise ModelLoadError(f"verify does not know the transformers class for task '{task}'")
    ours = from_pretrained(folder, task=task, dtype="float32")
    inputs = random_batch(ours.config, batch, seq, seed)
    if task == "seq2seq-lm":  # the decoder reads the same padded ids as its targets
        inputs.update(decoder_input_ids=inputs["input_ids"], decoder_attention_mask=inputs["attention_mask"])

    transformers.utils.logging.disable_progress_bar()
    auto = getattr(transformers, HF_AUTO_CLASSES[task])
    try:
        where = dict(pretrained_model_name_or_path=str(folder.parent), gguf_file=folder.name) \
            if hf.is_gguf(folder) else dict(pretrained_model_name_or_path=str(folder))
        theirs = auto.from_pretrained(**where, dtype=torch.float32).eval()
    except Exception as e:  # transformers' own loading error, as one line
        raise ModelLoadError(f"{folder}: transformers cannot load it: {first_line(e)}")
    with torch.no_grad():
        try:
            ref = theirs(**{k: torch.from_numpy(v) for k, v in inputs.items()}, output_hidden_states=True)
        except Exception as e:  # e.g. GPT-2 classification without pad_token_id
            raise ModelLoadError(f"{folder}: transformers cannot run it: {first_line(e)}")
    # Full fp32 matmuls: on GPUs/TPUs the default precision may use TF32/bf16 passes, which would
    # hide implementation errors below (or raise them above) the tolerance.
    with jax.default_matmul_precision("highest"):
        out = ours(**inputs, output_hidden_states=True)
    mask = inputs.get("attention_mask")
    if task == "seq2seq-lm":  # logits on the decoder's real positions, the encoder output on the source's
        keep = mask.astype(bool)
        return task, {name: float(np.abs(np.asarray(a, np.float64)[keep] - b.detach().double().numpy()[keep]).max())
                      for name, a, b in (("logits", out.logits, ref.logits),
                                         ("encoder_last_hidden_state", out.encoder_last_hidden_state,
                                          ref.encoder_last_hidden_state))}
    if "input_values" in inputs:  # speech: compare the frames made from real samples
        frames = out.last_hidden_state.shape[1] if out.last_hidden_state is not None else out.logits.shape[1]
        mask = np.arange(frames)[None, :] < np.asarray(ours.config.frames(mask.sum(-1)))[:, None]
    return task, max_abs_diffs(out, ref, mask, task)
