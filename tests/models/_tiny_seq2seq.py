"""Tiny random encoder-decoder checkpoints (T5, T5 v1.1, mT5, BART, Marian) for the seq2seq tests
(tests/models/test_t5.py, test_bart.py, test_seq2seq_*.py), built like `_tiny_gpt2_vit`: a
transformers (PyTorch) model with seeded random weights, every parameter perturbed away from its
init, saved with `save_pretrained`; the reference is what transformers reads back from the folder.

One feature set per variant (`VARIANTS`):

- t5: the original layout (ReLU, tied head scaled by d_model^-0.5), d_kv 5 * 3 heads = 15 != d_model
  24, 8 relative buckets over distance 20 (the log buckets are used), 2 encoder / 3 decoder blocks;
- t5-v1.1: gated-GELU, an untied `lm_head` (written into the checkpoint with tie_word_embeddings
  false, as v1.1 / FLAN config files say; transformers then leaves it untied), no output scaling;
- mt5: gated-GELU, tied, never scaled (transformers' MT5 code);
- bart: learned positions (+2 offset), layernorm_embedding, 3 encoder / 4 decoder heads, GELU;
- marian: sinusoidal positions, scaled embeddings, SiLU, pad = decoder start = the last token.

(Generation tests use symmetric layer counts: transformers' own T5 cache breaks when the decoder
has more blocks than the encoder.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

T5_COMMON = dict(vocab_size=61, d_model=24, d_kv=5, d_ff=37, num_layers=2, num_heads=3,
                 relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
                 pad_token_id=0, eos_token_id=1, layer_norm_epsilon=1e-5)
BART_COMMON = dict(vocab_size=61, d_model=24, encoder_layers=2, decoder_layers=2, encoder_attention_heads=3,
                   decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=29, max_position_embeddings=40)
VARIANTS = {  # name -> (HF config class, HF seq2seq class, HF base class, config)
    "t5": ("T5Config", "T5ForConditionalGeneration", "T5EncoderModel",
           dict(T5_COMMON, feed_forward_proj="relu", num_decoder_layers=3)),
    "t5-v1.1": ("T5Config", "T5ForConditionalGeneration", "T5EncoderModel",
                dict(T5_COMMON, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", "MT5EncoderModel", dict(T5_COMMON)),
    "bart": ("BartConfig", "BartForConditionalGeneration", "BartModel",
             dict(BART_COMMON, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)),
    "marian": ("MarianConfig", "MarianMTModel", "MarianModel",
               dict(BART_COMMON, pad_token_id=60, eos_token_id=0, decoder_start_token_id=60, scale_embedding=True,
                    activation_function="silu")),
}


class Tiny(NamedTuple):
    path: Path
    model: Any  # the transformers seq2seq model read back from `path`, eval mode
    base: Any  # the transformers base model (T5EncoderModel, BartModel, ...) read from `path`


def build(variant: str, path: Path, seed: int = 0, scale: float = 0.1, matrix_scale: float = 0.1) -> Tiny:
    """`scale`: the perturbation of vectors (biases, norms); `matrix_scale`: of matrices (a larger
    one makes a model whose outputs depend more on its inputs: more varied generations)."""
    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    config_cls, cls, base_cls, config = VARIANTS[variant]
    untied = config.get("tie_word_embeddings") is False
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights are one Parameter: perturbed once
            if "embed_positions" not in name or variant != "marian":  # Marian's are fixed sinusoids
                p.add_((matrix_scale if p.ndim > 1 else scale) * torch.randn_like(p))
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.add_(scale * torch.randn_like(model.final_logits_bias))
    model.save_pretrained(path)
    if untied:  # transformers 5 always ties T5; write the untied head a v1.1 checkpoint holds
        tensors = load_file(path / "model.safetensors")
        rng = np.random.default_rng(seed)
        tensors["lm_head.weight"] = rng.normal(0, 0.3, tensors["shared.weight"].shape).astype(np.float32)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(tie_word_embeddings=False)
        cfg.pop("scale_decoder_outputs", None)
        (path / "config.json").write_text(json.dumps(cfg))
    ref = getattr(transformers, cls).from_pretrained(path).eval()
    base = getattr(transformers, base_cls).from_pretrained(path).eval()
    return Tiny(path, ref, base)


class Factory:
    """`make(variant) -> Tiny`, each checkpoint built once per factory."""

    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.cache: dict = {}

    def __call__(self, variant: str, **kwargs) -> Tiny:
        key = (variant, tuple(sorted(kwargs.items())))
        if key not in self.cache:
            self.cache[key] = build(variant, self.tmp.mktemp(variant), **kwargs)
        return self.cache[key]


def batch(config, seed: int = 0, batch: int = 3, source: int = 11, target: int = 7, source_side: str = "right"):
    """Random source and target ids (never pad or EOS); source rows of length 11, 7, 4 (padded on
    `source_side`), target rows of length 7, 4, 7 (right-padded)."""
    rng = np.random.default_rng(seed)
    lo, hi = 3, config.vocab_size - 1  # every variant's special ids are below 3 or the last id
    ids = rng.integers(lo, hi, (batch, source))
    mask = (np.arange(source)[None] < np.array([source, 7, 4])[:batch, None]).astype(np.int64)
    if source_side == "left":
        mask = mask[:, ::-1].copy()
    dec = rng.integers(lo, hi, (batch, target))
    dec_mask = (np.arange(target)[None] < np.array([target, 4, target])[:batch, None]).astype(np.int64)
    pad = config.pad_token_id
    return {"input_ids": np.where(mask == 1, ids, pad), "attention_mask": mask,
            "decoder_input_ids": np.where(dec_mask == 1, dec, pad), "decoder_attention_mask": dec_mask}


def torch_forward(model, b: dict, **kwargs):
    import torch

    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v)) for k, v in b.items()}, **kwargs)


def max_diff(a, b, keep=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if keep is not None:
        a, b = a[keep], b[keep]
    return float(np.abs(a - b).max())


# Sharded training (test_seq2seq_parallel.py): widths the default rules split (embed over fsdp,
# heads / mlp / vocab over tensor), no dropout so one device and eight compute the same numbers;
# one block per stack (compiling the steps is most of the test's time).
T5_SHARDED = dict(model_type="t5", vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0)
BART_SHARDED = dict(model_type="bart", vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    max_position_embeddings=32, dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                    decoder_start_token_id=2)


def seq2seq_batches(steps: int = 3, batch: int = 8, source: int = 10, target: int = 6, pad: int = 0) -> list[dict]:
    """Right-padded source/target batches with labels (-100 on target padding); batch 1 has two
    weight-0 filler rows."""
    rs = np.random.RandomState(0)
    out = []
    for i in range(steps):
        ids = rs.randint(3, 64, (batch, source)).astype(np.int32)
        mask = (np.arange(source)[None] < rs.randint(3, source + 1, (batch, 1))).astype(np.int32)
        tgt = rs.randint(3, 64, (batch, target)).astype(np.int32)
        tmask = (np.arange(target)[None] < rs.randint(2, target + 1, (batch, 1))).astype(np.int32)
        labels = np.where(tmask == 1, tgt, -100).astype(np.int32)
        dec = np.concatenate([np.full((batch, 1), 0 if pad == 0 else 2, np.int32), np.where(tmask == 1, tgt, pad)[:, :-1]],
                             axis=1).astype(np.int32)
        b = dict(input_ids=np.where(mask == 1, ids, pad).astype(np.int32), attention_mask=mask,
                 decoder_input_ids=dec, decoder_attention_mask=np.concatenate(
                     [np.ones((batch, 1), np.int32), tmask[:, :-1]], axis=1),
                 labels=labels, weights=np.ones(batch, np.float32))
        if i == 1:
            b["weights"][-2:] = 0.0
        out.append(b)
    return out


# ---------------------------------------------------------------------------------------------
# The checks every family's test file runs (test_t5.py, test_bart.py)

ATOL = 1e-4


def forward(model, **inputs):
    """`model(**inputs)`, op by op: the variants share shapes, so JAX's per-op cache serves them all
    (cheaper here than one whole-model compile per variant and input set)."""
    return model(**{k: np.asarray(v) for k, v in inputs.items()})


def check_parity(t: Tiny, lm, base, *, base_is_encoder: bool):
    """seq2seq-lm logits (decoder padding) and encoder output for right- and left-padded sources;
    the base head against transformers' base class; decoder inputs made from -100 labels."""
    cfg = t.model.config
    for seed, side in ((0, "right"), (1, "left")):
        b = batch(cfg, seed=seed, source_side=side)
        ref = torch_forward(t.model, b)
        out = forward(lm, **b)
        keep, src_keep = b["decoder_attention_mask"].astype(bool), b["attention_mask"].astype(bool)
        assert np.abs(ref.logits.numpy()).max() > 0.05
        assert max_diff(out.logits, ref.logits.numpy(), keep) <= ATOL, side
        assert max_diff(out.encoder_last_hidden_state, ref.encoder_last_hidden_state.numpy(), src_keep) <= ATOL
        if base_is_encoder:
            src = {k: b[k] for k in ("input_ids", "attention_mask")}
            assert max_diff(forward(base, **src).last_hidden_state, torch_forward(t.base, src).last_hidden_state.numpy(),
                            src_keep) <= ATOL
        else:
            theirs = torch_forward(t.base, b)
            assert max_diff(forward(base, **b).last_hidden_state, theirs.last_hidden_state.numpy(), keep) <= ATOL
    # decoder inputs from labels: the start token, then the labels shifted right (-100 -> pad)
    b = batch(cfg, seed=2)
    labels = np.where(b["decoder_attention_mask"] == 1, b["decoder_input_ids"], -100)
    src = {k: b[k] for k in ("input_ids", "attention_mask")}
    ref = torch_forward(t.model, {**src, "labels": labels}).logits.numpy()
    assert max_diff(forward(lm, **src, labels=labels).logits, ref) <= ATOL


def check_export(t: Tiny, lm, base, out_dir: Path):
    """transformers reads jaxtune's export of both heads with the same outputs."""
    import transformers

    from jaxtune.models import save_pretrained

    cfg = t.model.config
    b = batch(cfg, seed=3)
    keep, src_keep = b["decoder_attention_mask"].astype(bool), b["attention_mask"].astype(bool)
    save_pretrained(lm, out_dir / "lm")
    written = json.loads((out_dir / "lm" / "config.json").read_text())
    assert written["model_type"] == cfg.model_type and written["architectures"] == [type(t.model).__name__]
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(out_dir / "lm").eval()
    assert type(theirs) is type(t.model)
    assert (theirs.lm_head.weight is theirs.get_input_embeddings().weight) == (
        theirs.lm_head.weight is t.model.get_input_embeddings().weight or
        t.model.lm_head.weight is t.model.get_input_embeddings().weight)
    ref = torch_forward(theirs, b)
    assert max_diff(forward(lm, **b).logits, ref.logits.numpy(), keep) <= ATOL
    assert max_diff(ref.logits.numpy(), torch_forward(t.model, b).logits.numpy(), keep) == 0.0  # same weights
    save_pretrained(base, out_dir / "base")
    theirs_base = type(t.base).from_pretrained(out_dir / "base").eval()
    if "Encoder" in type(t.base).__name__:
        src = {k: b[k] for k in ("input_ids", "attention_mask")}
        assert max_diff(forward(base, **src).last_hidden_state, torch_forward(theirs_base, src).last_hidden_state.numpy(),
                        src_keep) <= ATOL
    else:
        assert max_diff(forward(base, **b).last_hidden_state, torch_forward(theirs_base, b).last_hidden_state.numpy(),
                        keep) <= ATOL
