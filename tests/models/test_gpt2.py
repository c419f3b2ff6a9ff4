"""GPT-2: fp32 parity with transformers (PyTorch) for every head, right and left padding, packed rows,
export round trips both ways, the key table, logical axes, depth, `jaxtune verify`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxtune.errors import JaxtuneError
from jaxtune.models import from_config, from_pretrained, get_family, logical_axes, save_pretrained, split
from jaxtune.models import depth_tree, flatten

import _tiny_gpt2_vit as tg

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tg.Factory(tmp_path_factory)


CASES = [
    ("base", {}),
    ("causal-lm", {}),
    ("sequence-classification", {"num_labels": 3}),
    ("sequence-classification", {"num_labels": 4, "problem_type": "multi_label_classification"}),
    ("sequence-classification", {"num_labels": 1, "problem_type": "regression"}),
]


@pytest.mark.parametrize("task,overrides", CASES, ids=lambda c: c if isinstance(c, str) else
                         "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_parity_right_padded(tiny, task, overrides):
    t = tiny("gpt2", task, **overrides)
    batch = tg.token_batch()
    keep = batch["attention_mask"].astype(bool)
    ref = tg.torch_forward(t.model, batch, output_hidden_states=True)
    out = from_pretrained(t.path, task=task)(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):  # embeddings .. ln_f output
        assert tg.max_diff(ours, theirs.numpy(), keep) <= ATOL
    if task == "base":
        assert tg.max_diff(out.last_hidden_state, ref.last_hidden_state.numpy(), keep) <= ATOL
        return
    logits = ref.logits.numpy()
    assert np.abs(logits).max() > 0.05
    assert tg.max_diff(out.logits, logits, keep if task == "causal-lm" else None) <= ATOL


def test_left_padding_positions(tiny):
    """HF's forward numbers positions 0..T-1 whatever the padding; generation numbers real tokens
    (cumsum(mask) - 1). Both match transformers, and with the latter a left-padded row equals the
    same tokens unpadded."""
    t = tiny("gpt2", "causal-lm")
    batch = tg.token_batch(side="left")
    keep = batch["attention_mask"].astype(bool)
    assert not keep[:, 0].all()  # really left-padded
    model = from_pretrained(t.path)
    ref = tg.torch_forward(t.model, batch)
    assert tg.max_diff(model(**batch).logits, ref.logits.numpy(), keep) <= ATOL

    mask = batch["attention_mask"]
    pos = np.where(mask == 1, np.cumsum(mask, 1) - 1, 0)
    ref = tg.torch_forward(t.model, {**batch, "position_ids": pos})
    out = model(**batch, position_ids=pos)
    assert tg.max_diff(out.logits, ref.logits.numpy(), keep) <= ATOL
    row = batch["input_ids"][1][keep[1]][None]
    alone = model(input_ids=row).logits
    assert tg.max_diff(out.logits[1][keep[1]], alone[0]) <= ATOL


def test_sequence_classification_reads_last_non_pad_token(tiny):
    """transformers' rule: the rightmost token != pad_token_id, for right and left padding alike."""
    t = tiny("gpt2", "sequence-classification", num_labels=3)
    model = from_pretrained(t.path)
    for side in ("right", "left"):
        batch = tg.token_batch(side=side, seed=1)
        ref = tg.torch_forward(t.model, batch)
        assert tg.max_diff(model(**batch).logits, ref.logits.numpy()) <= ATOL
    # Row 1 (6 real tokens, right-padded) scores like its 6 tokens alone.
    batch = tg.token_batch(seed=2)
    alone = model(input_ids=batch["input_ids"][1:2, :6]).logits
    assert tg.max_diff(model(**batch).logits[1], alone[0]) <= ATOL


def test_sequence_classification_without_pad_token(tiny):
    t = tiny("gpt2", "sequence-classification", num_labels=2, pad_token_id=None)
    model = from_pretrained(t.path)
    batch = tg.token_batch()
    with pytest.raises(JaxtuneError, match="pad_token_id") as e:
        model(**batch)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError):  # transformers refuses too
        tg.torch_forward(t.model, batch)
    one = {k: v[:1] for k, v in batch.items()}  # one row: the last position, as transformers
    assert tg.max_diff(model(**one).logits, tg.torch_forward(t.model, one).logits.numpy()) <= ATOL


def test_token_type_ids_and_hf_options(tiny):
    """token_type_ids are looked up in wte (as HF does); scale_attn_by_inverse_layer_idx, no
    scale_attn_weights, relu and an untied LM head are honoured."""
    t = tiny("gpt2", "causal-lm", scale_attn_by_inverse_layer_idx=True, scale_attn_weights=False,
             activation_function="relu", tie_word_embeddings=False)
    model = from_pretrained(t.path)
    assert model.lm_head is not None
    batch = tg.token_batch()
    batch["token_type_ids"] = np.random.default_rng(3).integers(0, 5, batch["input_ids"].shape)
    keep = batch["attention_mask"].astype(bool)
    ref = tg.torch_forward(t.model, batch)
    assert tg.max_diff(model(**batch).logits, ref.logits.numpy(), keep) <= ATOL


def test_packed_rows_equal_examples_alone(tiny):
    """segment_ids: attention stays inside each example and positions restart, so every packed
    example's logits equal its logits alone."""
    model = from_pretrained(tiny("gpt2", "causal-lm").path)
    rng = np.random.default_rng(4)
    examples = [rng.integers(3, 97, n) for n in (5, 3, 7, 2)]
    ids = np.zeros((1, 20), np.int64)
    seg = np.zeros((1, 20), np.int64)
    starts = np.cumsum([0] + [len(e) for e in examples])
    for s, e in enumerate(examples):
        ids[0, starts[s]:starts[s + 1]] = e
        seg[0, starts[s]:starts[s + 1]] = s + 1
    packed = model(input_ids=ids, segment_ids=seg).logits[0]
    for s, e in enumerate(examples):
        alone = model(input_ids=e[None]).logits[0]
        assert tg.max_diff(packed[starts[s]:starts[s + 1]], alone) <= ATOL
    # Without segment_ids the same row differs (attention crosses examples).
    assert tg.max_diff(model(input_ids=ids).logits[0][starts[1]:starts[2]],
                       model(input_ids=examples[1][None]).logits[0]) > 1e-3


def test_export_reloads_in_transformers_with_same_logits(tiny, tmp_path):
    """jaxtune-initialised models (no HF weights anywhere) exported and reloaded by transformers."""
    import transformers

    hf_cfg = tiny("gpt2", "base").model.config.to_dict()
    batch = tg.token_batch()
    keep = batch["attention_mask"].astype(bool)
    for task, auto in (("causal-lm", "AutoModelForCausalLM"), ("sequence-classification",
                                                                "AutoModelForSequenceClassification")):
        model = from_config(hf_cfg, task, id2label=["a", "b", "c"], seed=3)
        out_dir = save_pretrained(model, tmp_path / task)
        config = json.loads((out_dir / "config.json").read_text())
        assert config["model_type"] == "gpt2" and config["architectures"] == [type(model).hf_architecture]
        theirs = getattr(transformers, auto).from_pretrained(str(out_dir)).eval()
        ref = tg.torch_forward(theirs, batch).logits.numpy()
        ours = np.asarray(model(**batch).logits)
        if task == "causal-lm":
            ours, ref = ours[keep], ref[keep]
        assert np.abs(ref).max() > 1e-3
        np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_transformers_to_jaxtune_to_disk_is_bit_identical(tiny, tmp_path):
    from safetensors.numpy import load_file

    t = tiny("gpt2", "causal-lm")
    first = from_pretrained(t.path)
    save_pretrained(first, tmp_path / "a")
    second = from_pretrained(tmp_path / "a")
    a, b = flatten(split(first)[1]), flatten(split(second)[1])
    assert a.keys() == b.keys()
    for path in a:
        assert np.array_equal(np.asarray(a[path]), np.asarray(b[path])), path
    orig, exported = load_file(t.path / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors")
    assert set(exported) == set(orig)  # Conv1D layouts and the fused c_attn written back as HF has them
    for key, value in exported.items():
        assert np.array_equal(orig[key], value), key
    # c_attn is split per q/k/v here: (D, 3, D) from HF's (D, 3D), not transposed.
    c_attn = split(first)[1]["transformer"]["h"][0]["attn"]["c_attn"]["kernel"]
    assert c_attn.shape == (30, 3, 30)
    np.testing.assert_array_equal(np.asarray(c_attn).reshape(30, 90), orig["transformer.h.0.attn.c_attn.weight"])


def test_base_checkpoint_loads_heads(tiny, caplog):
    """A GPT2Model checkpoint (no `transformer.` prefix): the LM head is tied (nothing new), the
    classifier `score` starts fresh and is named."""
    t = tiny("gpt2", "base")
    lm, info = from_pretrained(t.path, task="causal-lm", output_loading_info=True)
    assert info["fresh"] == [] and info["unexpected_keys"] == []
    ref = tg.torch_forward(t.model, tg.token_batch()).last_hidden_state.numpy()
    keep = tg.token_batch()["attention_mask"].astype(bool)
    assert tg.max_diff(lm(**tg.token_batch()).last_hidden_state, ref, keep) <= ATOL
    cls, info = from_pretrained(t.path, task="sequence-classification", num_labels=3, output_loading_info=True)
    assert info["fresh"] == [("score", "kernel")]


def test_hub_checkpoint_buffers_are_ignored(tiny, tmp_path):
    """openai-community/gpt2's file keeps old causal-mask buffers `h.i.attn.bias` / `masked_bias`
    beside `h.i.attn.c_attn.bias`: skipped silently, the real c_attn bias is loaded."""
    import shutil

    from safetensors.numpy import load_file, save_file

    t = tiny("gpt2", "base")
    folder = tmp_path / "hub"
    shutil.copytree(t.path, folder)
    tensors = load_file(folder / "model.safetensors")
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 48, 48), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model, info = from_pretrained(folder, task="causal-lm", output_loading_info=True)
    assert info["unexpected_keys"] == [] and info["missing_keys"] == []
    bias = np.asarray(split(model)[1]["transformer"]["h"][1]["attn"]["c_attn"]["bias"]).reshape(-1)
    np.testing.assert_array_equal(bias, tensors["h.1.attn.c_attn.bias"])


def test_logical_axes_and_depth(tiny):
    model = from_pretrained(tiny("gpt2", "causal-lm").path)
    params = split(model)[1]
    axes = flatten(logical_axes(model))
    layer = ("transformer", "h", 1)
    assert axes[("transformer", "wte", "embedding")] == ("vocab", "embed")
    assert axes[("transformer", "wpe", "embedding")] == ("position", "embed")
    assert axes[layer + ("attn", "c_attn", "kernel")] == ("embed", None, "heads")
    assert axes[layer + ("attn", "c_attn", "bias")] == (None, "heads")
    assert axes[layer + ("attn", "c_proj", "kernel")] == ("heads", "embed")
    assert axes[layer + ("mlp", "c_fc", "kernel")] == ("embed", "mlp")
    assert axes[layer + ("mlp", "c_proj", "kernel")] == ("mlp", "embed")
    assert axes[("transformer", "ln_f", "scale")] == ("embed",)
    for path, names in axes.items():
        assert len(names) == flatten(params)[path].ndim, path
    depth = flatten(depth_tree(get_family("gpt2"), model.config, params))
    assert depth[("transformer", "wte", "embedding")] == depth[("transformer", "wpe", "embedding")] == 0
    assert depth[("transformer", "h", 0, "ln_1", "scale")] == 1
    assert depth[layer + ("mlp", "c_fc", "kernel")] == 2
    assert depth[("transformer", "ln_f", "bias")] == 3
    cls = from_config(model.config.to_hf(), "sequence-classification", num_labels=2)
    assert flatten(depth_tree(get_family("gpt2"), cls.config, split(cls)[1]))[("score", "kernel")] == 3


def test_verify_cli(tiny):
    from click.testing import CliRunner

    from jaxtune.cli import main

    for task in ("causal-lm", "sequence-classification"):
        t = tiny("gpt2", task, **({"num_labels": 3} if task != "causal-lm" else {}))
        result = CliRunner().invoke(main, ["verify", str(t.path), "--batch", "3"])
        assert result.exit_code == 0, result.output
        assert f"task {task}" in result.output and "logits" in result.output
