"""Wav2Vec2 and HuBERT: fp32 parity with transformers (PyTorch) for the base model and the CTC head
in both layouts (group-norm feature encoder + post-norm encoder; layer-norm feature encoder +
pre-norm encoder) on right-padded batches with an attention mask; export round trips both ways;
old weight_g / weight_v checkpoints; SpecAugment's masks; remat, bf16, logical axes, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxtune.errors import JaxtuneError, ModelLoadError
from jaxtune.models import (depth_tree, family_of, flatten, from_config, from_pretrained, logical_axes, merge,
                            save_pretrained, split)
from jaxtune.models.wav2vec2.modeling import span_mask

ATOL = 1e-4
# Tiny configs exercising the non-defaults: conv biases, an odd and an even positional width,
# 3 heads, a relu feed-forward.
TINY = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=20,
            conv_dim=(8, 12), conv_stride=(3, 2), conv_kernel=(5, 3), num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2, vocab_size=11, conv_bias=True)
LAYOUTS = {
    "wav2vec2-base": ("Wav2Vec2", dict(TINY)),
    "wav2vec2-lv60": ("Wav2Vec2", dict(TINY, do_stable_layer_norm=True, feat_extract_norm="layer",
                                       num_conv_pos_embeddings=5, hidden_act="relu")),
    "hubert-base": ("Hubert", dict(TINY)),
    "hubert-lv60": ("Hubert", dict(TINY, do_stable_layer_norm=True, feat_extract_norm="layer",
                                   feat_proj_layer_norm=False, conv_bias=False)),
}
HEADS = {"base": "Model", "ctc": "ForCTC"}


def build_hf(layout: str, task: str, seed: int = 0):
    import torch
    import transformers

    prefix, kw = LAYOUTS[layout]
    torch.manual_seed(seed)
    model = getattr(transformers, prefix + HEADS[task])(getattr(transformers, prefix + "Config")(**kw)).eval()
    with torch.no_grad():  # every parameter away from its init, so norms, biases and g all matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def make(layout: str, task: str):
        if (layout, task) not in cache:
            model = build_hf(layout, task)
            path = tmp_path_factory.mktemp(f"{layout}-{task}")
            model.save_pretrained(path)
            cache[layout, task] = (path, model)
        return cache[layout, task]

    return make


def audio_batch(seed: int = 0, samples: int = 230):
    """Three waveforms, right-padded with zeros: full length, 180 and 100 samples."""
    rng = np.random.default_rng(seed)
    mask = np.ones((3, samples), np.int64)
    mask[1, 180:] = 0
    mask[2, 100:] = 0
    return {"input_values": (rng.normal(size=(3, samples)) * mask).astype(np.float32), "attention_mask": mask}


def torch_forward(model, batch):
    import torch

    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()}, output_hidden_states=True)


def real_frames(model, batch) -> np.ndarray:
    base = model if not hasattr(model, "lm_head") else getattr(model, model.base_prefix)
    frames = int(model.config.frames(batch["input_values"].shape[1]))
    return np.asarray(base.feature_mask(batch["attention_mask"], frames)).astype(bool)


@pytest.mark.parametrize("task", list(HEADS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parity_with_transformers_on_padded_batches(tiny, layout, task):
    path, hf_model = tiny(layout, task)
    batch = audio_batch()
    ref = torch_forward(hf_model, batch)
    model = from_pretrained(path)
    out = model(**batch, output_hidden_states=True)
    keep = real_frames(model, batch)
    assert keep.sum(1).tolist() == [37, 29, 15]  # frames of 230, 180 and 100 samples
    # hidden_states: the encoder's input and each layer's output, as transformers returns them
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert np.abs(np.asarray(ours) - theirs.numpy())[keep].max() <= ATOL
    if task == "base":
        ours, theirs = out.last_hidden_state, ref.last_hidden_state.numpy()
    else:
        ours, theirs = out.logits, ref.logits.numpy()
        assert ours.shape == (3, 37, 11)
    assert np.abs(theirs[keep]).max() > 0.05
    assert np.abs(np.asarray(ours) - theirs)[keep].max() <= ATOL
    # unpadded rows need no mask
    single = {"input_values": batch["input_values"][:1]}
    ref1 = torch_forward(hf_model, single)
    out1 = model(**single)
    a = out1.last_hidden_state if task == "base" else out1.logits
    b = ref1.last_hidden_state if task == "base" else ref1.logits
    assert np.abs(np.asarray(a) - b.numpy()).max() <= ATOL


@pytest.mark.parametrize("layout", ["wav2vec2-lv60", "hubert-base"])
def test_export_reloads_in_transformers_with_same_logits(tiny, tmp_path, layout):
    import transformers

    path, hf_model = tiny(layout, "base")
    model = from_config(hf_model.config.to_dict(), "ctc", seed=3)
    out_dir = save_pretrained(model, tmp_path / "e")
    config = json.loads((out_dir / "config.json").read_text())
    arch = ("Hubert" if layout.startswith("hubert") else "Wav2Vec2") + "ForCTC"
    assert config["architectures"] == [arch] and config["conv_dim"] == [8, 12]
    theirs = transformers.AutoModelForCTC.from_pretrained(str(out_dir)).eval()
    assert type(theirs).__name__ == arch
    batch = audio_batch(seed=1)
    ref = torch_forward(theirs, batch).logits.numpy()
    keep = real_frames(model, batch)
    assert np.abs(ref[keep]).max() > 1e-3
    assert np.abs(np.asarray(model(**batch).logits) - ref)[keep].max() <= ATOL


@pytest.mark.parametrize("layout", ["wav2vec2-base", "hubert-lv60"])
def test_transformers_to_jaxtune_to_disk_is_bit_identical(tiny, tmp_path, layout):
    path, _ = tiny(layout, "ctc")
    first = from_pretrained(path)
    save_pretrained(first, tmp_path / "a")
    orig, exported = load_file(path / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors")
    assert set(exported) == set(orig)
    for key, value in exported.items():
        assert np.array_equal(orig[key], value), key
    prefix = "hubert." if layout.startswith("hubert") else "wav2vec2."
    # the convolutions: torch (out, in, k) <-> flax (k, in, out); g: torch (1, 1, k) <-> (k,)
    base = getattr(first, first.base_prefix)
    kernel = np.asarray(base.feature_extractor.conv_layers[1].conv.kernel[...])
    assert kernel.shape == (3, 8, 12)
    np.testing.assert_array_equal(kernel.transpose(2, 1, 0), orig[prefix + "feature_extractor.conv_layers.1.conv.weight"])
    g = np.asarray(base.encoder.pos_conv_embed.conv.weight_g[...])
    assert g.shape == (LAYOUTS[layout][1].get("num_conv_pos_embeddings"),)
    np.testing.assert_array_equal(g, orig[prefix + "encoder.pos_conv_embed.conv.parametrizations.weight.original0"].ravel())


def test_old_weight_norm_names_load(tiny, tmp_path):
    """Checkpoints saved with torch.nn.utils.weight_norm name g and v `weight_g` / `weight_v`."""
    import shutil

    path, hf_model = tiny("wav2vec2-base", "ctc")
    old = tmp_path / "old"
    shutil.copytree(path, old)
    tensors = load_file(path / "model.safetensors")
    renamed = {k.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"): v for k, v in tensors.items()}
    assert any(k.endswith("conv.weight_g") for k in renamed)
    save_file(renamed, old / "model.safetensors", metadata={"format": "pt"})
    model, info = from_pretrained(old, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = audio_batch()
    keep = real_frames(model, batch)
    ref = torch_forward(hf_model, batch).logits.numpy()
    assert np.abs(np.asarray(model(**batch).logits) - ref)[keep].max() <= ATOL


def test_base_checkpoint_gets_a_fresh_ctc_head(tiny):
    path, hf_model = tiny("hubert-base", "base")
    model, info = from_pretrained(path, task="ctc", output_loading_info=True)
    assert sorted(info["fresh"]) == [("lm_head", "bias"), ("lm_head", "kernel")]
    out = model(**audio_batch(), output_hidden_states=True)
    ref = torch_forward(hf_model, audio_batch())
    keep = real_frames(model, audio_batch())
    assert np.abs(np.asarray(out.hidden_states[-1]) - ref.hidden_states[-1].numpy())[keep].max() <= ATOL


def test_span_mask_draws_spans_like_transformers():
    """Spans of `span` frames from distinct starts within each row's length, as many as
    int(prob * length / span + eps) (at least min_spans); the same key draws the same mask."""
    lengths = jnp.array([100, 60, 9, 3])
    key = jax.random.key(0)
    m = np.asarray(span_mask(key, lengths, 100, 0.3, 5, 2))
    assert m.shape == (4, 100)
    for row, n in zip(m, [100, 60, 9, 3]):
        assert not row[n:].any()  # nothing past the row's length
    # row 0: 6 spans of 5 (30 frames at most, fewer where spans overlap; at least one whole span)
    assert 5 <= m[0].sum() <= 30 and 5 <= m[1].sum() <= 20
    # a row of 9 frames fits min_spans=2 spans of 5 (starts 0..4); a row of 3 fits none
    assert 5 <= m[2].sum() <= 9 and m[3].sum() == 0
    np.testing.assert_array_equal(m, np.asarray(span_mask(key, lengths, 100, 0.3, 5, 2)))
    assert not np.array_equal(m, np.asarray(span_mask(jax.random.key(1), lengths, 100, 0.3, 5, 2)))
    # every masked run is made of whole spans: each run is at least `span` long
    runs = np.diff(np.concatenate([[0], m[0].astype(int), [0]]))
    starts, ends = np.flatnonzero(runs == 1), np.flatnonzero(runs == -1)
    assert ((ends - starts) >= 5).all()


def test_training_mode_applies_spec_augment_from_the_key(tiny):
    path, _ = tiny("wav2vec2-base", "ctc")
    overrides = dict(mask_time_prob=0.5, mask_time_length=2, mask_feature_prob=0.5, mask_feature_length=4,
                     layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     final_dropout=0.0, feat_proj_dropout=0.0)
    model = from_pretrained(path, config_overrides=overrides)
    batch = audio_batch()
    plain = np.asarray(model(**batch).logits)
    a = np.asarray(model(**batch, deterministic=False, rngs=jax.random.key(0)).logits)
    b = np.asarray(model(**batch, deterministic=False, rngs=jax.random.key(0)).logits)
    c = np.asarray(model(**batch, deterministic=False, rngs=jax.random.key(7)).logits)
    np.testing.assert_array_equal(a, b)  # a pure function of the key
    assert np.abs(a - plain).max() > 1e-3 and np.abs(a - c).max() > 1e-3
    off = from_pretrained(path, config_overrides={**overrides, "apply_spec_augment": False})
    np.testing.assert_allclose(np.asarray(off(**batch, deterministic=False, rngs=jax.random.key(0)).logits),
                               plain, atol=1e-6)


def test_remat_gives_the_same_gradients_and_bf16_compute_stays_close(tiny):
    path, _ = tiny("wav2vec2-lv60", "ctc")
    batch = audio_batch()
    keep = real_frames(from_pretrained(path), batch)

    def loss_of(model):
        graphdef, params, rest = split(model)

        def loss(p):
            logits = merge(graphdef, p, rest)(**batch).logits
            return jnp.sum(jnp.where(keep[..., None], logits, 0) ** 2)

        return jax.grad(loss), params

    (plain_grad, params), (remat_grad, same) = loss_of(from_pretrained(path)), loss_of(from_pretrained(path, remat=True))
    assert "remat" in str(jax.make_jaxpr(remat_grad)(same))  # the layers are rematerialised
    plain, remat = flatten(plain_grad(params)), flatten(remat_grad(same))
    for p in plain:
        np.testing.assert_allclose(np.asarray(remat[p]), np.asarray(plain[p]), rtol=1e-4, atol=1e-5)
    f32 = np.asarray(from_pretrained(path)(**batch).logits)
    bf16 = from_pretrained(path, compute_dtype="bfloat16")(**batch).logits
    assert bf16.dtype == jnp.float32  # logits in float32 whatever the compute dtype
    err = np.abs(np.asarray(bf16) - f32)[keep]
    assert 0 < err.max() < 0.1 * np.abs(f32[keep]).max()


def test_logical_axes_and_depth(tiny):
    path, _ = tiny("hubert-base", "ctc")
    model = from_pretrained(path)
    axes = {"/".join(map(str, p)): a for p, a in flatten(logical_axes(model)).items()}
    assert axes["hubert/feature_extractor/conv_layers/1/conv/kernel"] == (None, "conv", "conv")
    assert axes["hubert/feature_extractor/conv_layers/0/conv/kernel"] == (None, None, "conv")
    assert axes["hubert/feature_projection/projection/kernel"] == ("conv", "embed")
    assert axes["hubert/encoder/pos_conv_embed/conv/weight_v"] == (None, None, "embed")
    assert axes["hubert/encoder/layers/0/attention/q_proj/kernel"] == ("embed", "heads")
    assert axes["hubert/encoder/layers/1/feed_forward/output_dense/kernel"] == ("mlp", "embed")
    assert axes["lm_head/kernel"] == ("embed", "vocab")
    depth = {"/".join(map(str, p)): d for p, d in flatten(depth_tree(family_of(model), model.config,
                                                                      split(model)[1])).items()}
    assert depth["hubert/feature_extractor/conv_layers/0/conv/kernel"] == 0
    assert depth["hubert/encoder/pos_conv_embed/conv/weight_g"] == 0
    assert depth["hubert/encoder/layers/1/attention/k_proj/kernel"] == 2
    assert depth["lm_head/bias"] == depth["hubert/encoder/layer_norm/scale"] == 3


def test_bad_inputs_and_configs_are_one_line_errors(tiny):
    path, _ = tiny("wav2vec2-base", "ctc")
    model = from_pretrained(path)
    for kwargs, needle in (
        ({"input_values": np.zeros((2, 10), np.float32)}, "receptive field"),
        ({"input_values": np.zeros((2, 1, 300), np.float32)}, r"\(batch, samples\)"),
        ({}, "input_values"),
    ):
        with pytest.raises(JaxtuneError, match=needle) as e:
            model(**kwargs)
        assert "\n" not in str(e.value)
    for bad, needle in (({"feat_extract_norm": "batch"}, "feat_extract_norm"),
                        ({"conv_kernel": [5]}, "same"),
                        ({"add_adapter": True}, "adapters"),
                        ({"model_type": "hubert", "conv_pos_batch_norm": True}, "conv_pos_batch_norm")):
        with pytest.raises(ModelLoadError, match=needle):
            from_config({**TINY, "model_type": "wav2vec2", **bad}, "ctc")
