"""Llama family (llama, mistral, qwen2, qwen3): fp32 parity with transformers (PyTorch) for every head
with right and left padding, greedy generation token for token, export round trips, packed rows,
sliding windows, RoPE configs old and new, one-line errors, logical axes and depth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxtune.errors import JaxtuneError, ModelLoadError
from jaxtune.models import depth_tree, flatten, from_config, from_pretrained, get_family, logical_axes, split
from jaxtune.models import generate as gen
from jaxtune.models import save_pretrained

import _tiny_gpt2_vit as tg
import _tiny_llama as tl

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tl.Factory(tmp_path_factory)


@pytest.mark.parametrize("model_type", tl.MODEL_TYPES)
def test_parity_every_head_both_paddings(tiny, model_type):
    """causal-lm (hidden states too), base and sequence-classification, right- and left-padded."""
    for task in ("causal-lm", "base", "sequence-classification"):
        t = tiny(model_type, task, **({"num_labels": 3} if task == "sequence-classification" else {}))
        model = from_pretrained(t.path)
        assert type(model).__name__ == type(t.model).__name__
        for side in ("right", "left"):
            batch = tg.token_batch(side=side, seed=1 if side == "left" else 0)
            keep = batch["attention_mask"].astype(bool)
            ref = tg.torch_forward(t.model, batch, output_hidden_states=task == "causal-lm")
            out = model(**batch, output_hidden_states=task == "causal-lm")
            if task == "base":
                assert tg.max_diff(out.last_hidden_state, ref.last_hidden_state.numpy(), keep) <= ATOL
                continue
            logits = ref.logits.numpy()
            assert np.abs(logits).max() > 0.05
            assert tg.max_diff(out.logits, logits, keep if task == "causal-lm" else None) <= ATOL, (task, side)
            if task == "causal-lm":
                assert len(out.hidden_states) == len(ref.hidden_states) == t.model.config.num_hidden_layers + 1
                for ours, theirs in zip(out.hidden_states, ref.hidden_states):  # embeddings .. norm output
                    assert tg.max_diff(ours, theirs.numpy(), keep) <= ATOL


def test_sequence_classification_last_non_pad_token(tiny):
    t = tiny("qwen2", "sequence-classification", num_labels=3)
    model = from_pretrained(t.path)
    batch = tg.token_batch(seed=2)
    alone = model(input_ids=batch["input_ids"][1:2, :6]).logits  # row 1: 6 real tokens
    assert tg.max_diff(model(**batch).logits[1], alone[0]) <= ATOL
    no_pad = from_pretrained(t.path, config_overrides={"pad_token_id": None})
    with pytest.raises(JaxtuneError, match="pad_token_id") as e:
        no_pad(**batch)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model_type", tl.MODEL_TYPES)
def test_greedy_generation_matches_transformers(tiny, model_type):
    """Left-padded prompts (mistral's window 4 and qwen2's window 3 slide during decoding)."""
    import torch

    t = tiny(model_type, "causal-lm", scale=0.3)
    model = from_pretrained(t.path)
    ids = np.array([[0, 0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    mask = (ids != 0).astype(np.int64)
    new = 12
    with torch.no_grad():
        ref = t.model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                               max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = ref[:, ids.shape[1]:].numpy()
    assert len(set(ref.ravel().tolist())) > 3  # not a constant stream
    out = gen.generate(model, ids, mask, max_new_tokens=new, eos_token_id=(), pad_token_id=0)
    np.testing.assert_array_equal(out.tokens, ref)


@pytest.mark.parametrize("model_type", tl.MODEL_TYPES)
def test_export_reloads_in_transformers(tiny, tmp_path, model_type):
    import transformers

    t = tiny(model_type, "causal-lm")
    model = from_pretrained(t.path)
    save_pretrained(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == model_type
    assert written["architectures"] == [type(t.model).__name__]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(theirs) is type(t.model)
    for field in ("num_key_value_heads", "head_dim", "tie_word_embeddings", "sliding_window", "rope_parameters",
                  "layer_types"):
        assert getattr(theirs.config, field, None) == getattr(t.model.config, field, None), field
    batch = tg.token_batch(side="left")
    keep = batch["attention_mask"].astype(bool)
    ref = tg.torch_forward(theirs, batch).logits.numpy()
    assert tg.max_diff(model(**batch).logits, ref, keep) <= ATOL
    assert tg.max_diff(ref, tg.torch_forward(t.model, batch).logits.numpy(), keep) == 0.0  # same weights


def test_packed_rows_equal_examples_alone(tiny):
    """qwen2 (GQA, biases, sliding layers): with segment_ids each packed example's logits equal its
    logits alone."""
    model = from_pretrained(tiny("qwen2", "causal-lm").path)
    rng = np.random.default_rng(4)
    examples = [rng.integers(3, 97, n) for n in (5, 3, 7)]
    ids, seg = np.zeros((1, 18), np.int64), np.zeros((1, 18), np.int64)
    starts = np.cumsum([0] + [len(e) for e in examples])
    for s, e in enumerate(examples):
        ids[0, starts[s]:starts[s + 1]], seg[0, starts[s]:starts[s + 1]] = e, s + 1
    packed = model(input_ids=ids, segment_ids=seg).logits[0]
    alone_ids, alone_mask = np.zeros((3, 18), np.int64), np.zeros((3, 18), np.int64)  # one right-padded batch
    for s, e in enumerate(examples):
        alone_ids[s, :len(e)], alone_mask[s, :len(e)] = e, 1
    alone = model(input_ids=alone_ids, attention_mask=alone_mask).logits
    for s, e in enumerate(examples):
        assert tg.max_diff(packed[starts[s]:starts[s + 1]], alone[s, :len(e)]) <= ATOL
    crossed = model(input_ids=ids).logits[0]  # without segment_ids attention crosses examples
    assert tg.max_diff(crossed[starts[1]:starts[2]], alone[1, :3]) > 1e-3


def test_sliding_window_is_applied(tiny):
    """Mistral's window 4 < 9 tokens: without it the late positions change (and only those)."""
    t = tiny("mistral", "causal-lm")
    batch = {"input_ids": tg.token_batch()["input_ids"][:1]}
    windowed = np.asarray(from_pretrained(t.path)(**batch).logits)
    full = np.asarray(from_pretrained(t.path, config_overrides={"sliding_window": None})(**batch).logits)
    assert np.abs(windowed[0, :4] - full[0, :4]).max() <= 1e-6
    assert np.abs(windowed[0, 4:] - full[0, 4:]).max() > 1e-3
    cfg = from_pretrained(tiny("qwen2", "causal-lm").path).config
    assert [cfg.window(i) for i in range(3)] == [None, 3, 3]  # max_window_layers=1, as transformers


def test_rope_configs_old_and_new():
    """transformers 4's `rope_theta` + `rope_scaling` are read into `rope_parameters` (what
    transformers 5 writes); an unsupported type is one line naming it and the supported ones."""
    import transformers

    from jaxtune.models.llama.modeling import LlamaConfig, inv_freq

    old = dict(model_type="llama", hidden_size=32, num_attention_heads=4, rope_theta=5e5,
               rope_scaling={"type": "linear", "factor": 3.0}, max_position_embeddings=64)
    cfg = LlamaConfig.from_hf(old)
    assert cfg.rope == {"rope_type": "linear", "type": "linear", "factor": 3.0, "rope_theta": 5e5}
    hf = cfg.to_hf()
    assert "rope_scaling" not in hf and "rope_theta" not in hf and hf["rope_parameters"]["rope_theta"] == 5e5
    assert LlamaConfig.from_hf(hf).to_hf() == hf
    theirs = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(theirs)
    np.testing.assert_allclose(inv_freq(cfg.rope_parameters, cfg.head_dim), rotary.inv_freq.numpy(), rtol=1e-6)
    for kind in ("yarn", "dynamic"):
        with pytest.raises(ModelLoadError, match=f"rope type '{kind}' is not supported; supported: "
                                                 "default, linear, llama3") as e:
            from_config(dict(old, rope_scaling={"rope_type": kind, "factor": 2.0}), "causal-lm")
        assert "\n" not in str(e.value)


def test_logical_axes_and_depth(tiny):
    model = from_pretrained(tiny("qwen3", "causal-lm").path)
    params = split(model)[1]
    axes = flatten(logical_axes(model))
    layer = ("model", "layers", 1)
    assert axes[("model", "embed_tokens", "embedding")] == ("vocab", "embed")
    assert axes[layer + ("self_attn", "q_proj", "kernel")] == ("embed", "heads")
    assert axes[layer + ("self_attn", "k_proj", "kernel")] == ("embed", "kv")
    assert axes[layer + ("self_attn", "v_proj", "bias")] == ("kv",)
    assert axes[layer + ("self_attn", "o_proj", "kernel")] == ("heads", "embed")
    assert axes[layer + ("self_attn", "q_norm", "scale")] == (None,)
    assert axes[layer + ("mlp", "gate_proj", "kernel")] == ("embed", "mlp")
    assert axes[layer + ("mlp", "down_proj", "kernel")] == ("mlp", "embed")
    assert axes[("model", "norm", "scale")] == ("embed",)
    assert "lm_head" not in params  # tied
    for path, names in axes.items():
        assert len(names) == flatten(params)[path].ndim, path
    depth = flatten(depth_tree(get_family("qwen3"), model.config, params))
    assert depth[("model", "embed_tokens", "embedding")] == 0
    assert depth[layer + ("mlp", "up_proj", "kernel")] == 2
    assert depth[("model", "norm", "scale")] == 3
