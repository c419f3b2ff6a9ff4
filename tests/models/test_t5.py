"""T5 family (t5, T5 v1.1 layout, mt5): fp32 parity with transformers (PyTorch) for both heads with
encoder padding on either side and decoder padding, decoder inputs from labels, export round
trips, logical axes and depth, one-line config errors."""

from __future__ import annotations

import pytest

from jaxtune.errors import ModelLoadError
from jaxtune.models import depth_tree, flatten, from_config, from_pretrained, get_family, logical_axes, split

import _tiny_seq2seq as ts

VARIANTS = ("t5", "t5-v1.1", "mt5")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ts.Factory(tmp_path_factory)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_and_export(tiny, tmp_path, variant):
    t = tiny(variant)
    lm, base = from_pretrained(t.path), from_pretrained(t.path, task="base")
    assert type(lm).__name__ == type(t.model).__name__ and type(base).__name__ == type(t.base).__name__
    cfg = lm.config
    if variant == "t5-v1.1":  # the v1.1 layout: gated-GELU, an untied head, no output scaling
        assert cfg.gating == (True, "gelu_new") and lm.lm_head is not None and not cfg.scale_decoder_outputs
        assert t.model.lm_head.weight is not t.model.shared.weight
    elif variant == "t5":
        assert cfg.gating == (False, "relu") and lm.lm_head is None and cfg.scale_decoder_outputs
        assert cfg.num_decoder_layers == 3 and len(lm.decoder.block) == 3
    else:
        assert lm.lm_head is None and not cfg.scale_decoder_outputs
    ts.check_parity(t, lm, base, base_is_encoder=True)
    ts.check_export(t, lm, base, tmp_path)


def test_logical_axes_and_depth(tiny):
    model = from_pretrained(tiny("t5-v1.1").path)
    params = split(model)[1]
    axes = flatten(logical_axes(model))
    blk = ("decoder", "block", 1, "layer")
    assert axes[("shared", "embedding")] == ("vocab", "embed")
    assert axes[blk + (0, "SelfAttention", "q", "kernel")] == ("embed", "heads")
    assert axes[blk + (1, "EncDecAttention", "o", "kernel")] == ("heads", "embed")
    assert axes[blk + (2, "DenseReluDense", "wi_0", "kernel")] == ("embed", "mlp")
    assert axes[blk + (2, "DenseReluDense", "wo", "kernel")] == ("mlp", "embed")
    assert axes[("encoder", "block", 0, "layer", 0, "SelfAttention", "relative_attention_bias", "embedding")] == (
        None, None)
    assert axes[("lm_head", "kernel")] == ("embed", "vocab")
    assert ("encoder", "block", 1, "layer", 0, "SelfAttention", "relative_attention_bias", "embedding") not in axes
    for path, names in axes.items():
        assert len(names) == flatten(params)[path].ndim, path
    depth = flatten(depth_tree(get_family("t5"), model.config, params))
    assert depth[("shared", "embedding")] == 0
    assert depth[blk + (2, "DenseReluDense", "wo", "kernel")] == 2
    assert depth[("lm_head", "kernel")] == depth[("encoder", "final_layer_norm", "scale")] == 3


def test_config_errors_are_one_line():
    with pytest.raises(ModelLoadError, match="feed_forward_proj 'gated-gelu-x' is not") as e:
        from_config(dict(model_type="t5", d_model=8, d_kv=2, num_heads=2, feed_forward_proj="gated-gelu-x"),
                    "seq2seq-lm")
    assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="hidden_act 'swishy' is not supported") as e:
        from_config(dict(model_type="t5", d_model=8, d_kv=2, num_heads=2, feed_forward_proj="swishy"), "base")
    with pytest.raises(ModelLoadError, match="task 'causal-lm' is not supported by t5"):
        from_config(dict(model_type="t5", d_model=8, d_kv=2, num_heads=2), "causal-lm")

