"""ResNet (transformers' layout): fp32 parity with transformers (PyTorch) for both block types and
both heads (hidden states, pooled features, logits), export round trips both ways (BatchNorm
running statistics included), the convolution layout, input checks, logical axes and depth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from jaxtune.errors import JaxtuneError, ModelLoadError
from jaxtune.models import depth_tree, flatten, from_config, from_pretrained, get_family, logical_axes
from jaxtune.models import save_pretrained, split, unflatten
from jaxtune.models.trees import batch_stats

import _tiny_resnet as tr

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tr.Factory(tmp_path_factory)


CASES = [
    ("basic", "base", {}),
    ("basic", "image-classification", {"num_labels": 5, "downsample_in_first_stage": True, "hidden_act": "gelu"}),
    ("bottleneck", "base", {"downsample_in_bottleneck": True}),
    ("bottleneck", "image-classification", {"num_labels": 4}),
]


@pytest.mark.parametrize("layout,task,overrides", CASES, ids=lambda c: c if isinstance(c, str) else
                         "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_parity_with_transformers(tiny, layout, task, overrides):
    t = tiny(layout, task, **overrides)
    batch = tr.pixel_batch()
    ref = tr.torch_forward(t.model, batch, output_hidden_states=True)
    out = from_pretrained(t.path, task=task)(**batch, output_hidden_states=True)
    # the stem's output and each stage's, NCHW like transformers
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert ours.shape == tuple(theirs.shape)
        assert tr.max_diff(ours, theirs.numpy()) <= ATOL
    if task == "base":
        assert out.last_hidden_state.shape == tuple(ref.last_hidden_state.shape)
        assert tr.max_diff(out.last_hidden_state, ref.last_hidden_state.numpy()) <= ATOL
        assert tr.max_diff(out.pooler_output, ref.pooler_output.numpy()) <= ATOL
        return
    assert np.abs(ref.logits.numpy()).max() > 0.05
    assert out.logits.shape == (3, overrides["num_labels"])
    assert tr.max_diff(out.logits, ref.logits.numpy()) <= ATOL


def test_export_reloads_in_transformers_with_same_logits(tiny, tmp_path):
    """(Bottleneck checkpoints round-trip through jaxtune bit for bit below.)"""
    import transformers

    layout = "basic"
    hf_cfg = tiny(layout, "base").model.config.to_dict()
    model = from_config(hf_cfg, "image-classification", id2label=["shirt", "shoe", "bag"], seed=5)
    # statistics that are not the init's, so that reading them matters
    rng = np.random.default_rng(0)
    stats = {p: (v + 0.05 * rng.normal(size=v.shape) if p[-1] == "running_mean"
                 else v * np.exp(0.3 * rng.normal(size=v.shape)) if p[-1] == "running_var" else v + 4)
             for p, v in flatten(batch_stats(model)).items()}
    stats = {p: np.asarray(v, np.int32 if p[-1] == "num_batches_tracked" else np.float32) for p, v in stats.items()}
    out_dir = save_pretrained(model, tmp_path / "e", batch_stats=unflatten(stats))
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["ResNetForImageClassification"] and config["layer_type"] == layout
    theirs = transformers.AutoModelForImageClassification.from_pretrained(str(out_dir)).eval()
    assert theirs.config.id2label == {0: "shirt", 1: "shoe", 2: "bag"}
    bn = theirs.resnet.embedder.embedder.normalization
    assert int(bn.num_batches_tracked) == 4 and bn.num_batches_tracked.dtype.is_floating_point is False
    batch = tr.pixel_batch(seed=1)
    ref = tr.torch_forward(theirs, batch).logits.numpy()
    assert np.abs(ref).max() > 1e-3
    nnx.update(model, unflatten(stats))  # jaxtune's model with the same statistics
    np.testing.assert_allclose(np.asarray(model(**batch).logits), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task", ["base", "image-classification"])
def test_transformers_to_jaxtune_to_disk_is_bit_identical(tiny, tmp_path, task):
    from safetensors.numpy import load_file

    t = tiny("bottleneck", task, **({"num_labels": 4} if task != "base" else {}))
    first = from_pretrained(t.path)
    save_pretrained(first, tmp_path / "a")
    orig, exported = load_file(t.path / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors")
    assert set(exported) == set(orig)
    for key, value in exported.items():
        assert value.dtype == orig[key].dtype and np.array_equal(orig[key], value), key
    assert orig["embedder.embedder.normalization.num_batches_tracked" if task == "base"
                else "resnet.embedder.embedder.normalization.num_batches_tracked"] == 7
    # The convolution layout: torch (out, in, kh, kw) <-> (kh, kw, in, out).
    base = first.resnet if task != "base" else first
    prefix = "resnet." if task != "base" else ""
    kernel = np.asarray(base.embedder.embedder.convolution.kernel[...])
    assert kernel.shape == (7, 7, 2, 6)
    np.testing.assert_array_equal(kernel.transpose(3, 2, 0, 1), orig[prefix + "embedder.embedder.convolution.weight"])
    np.testing.assert_array_equal(np.asarray(base.embedder.embedder.normalization.running_var[...]),
                                  orig[prefix + "embedder.embedder.normalization.running_var"])


def test_base_checkpoint_gets_a_fresh_classifier(tiny):
    t = tiny("basic", "base")
    model, info = from_pretrained(t.path, task="image-classification", num_labels=4, output_loading_info=True)
    assert sorted(info["fresh"]) == [("classifier", "bias"), ("classifier", "kernel")]
    assert info["unexpected_keys"] == []
    ref = tr.torch_forward(t.model, tr.pixel_batch(), output_hidden_states=True)
    out = model(**tr.pixel_batch(), output_hidden_states=True)
    assert tr.max_diff(out.hidden_states[-1], ref.hidden_states[-1].numpy()) <= ATOL


def test_missing_statistics_and_bad_inputs_are_one_line_errors(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    t = tiny("basic", "image-classification", num_labels=5)
    model = from_pretrained(t.path)
    for kwargs, needle in ((tr.pixel_batch(channels=3), "3 channels"), ({}, "pixel_values")):
        with pytest.raises(JaxtuneError, match=needle) as e:
            model(**kwargs)
        assert "\n" not in str(e.value)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((t.path / "config.json").read_text())
    tensors = load_file(t.path / "model.safetensors")
    del tensors["resnet.encoder.stages.1.layers.0.shortcut.normalization.running_var"]
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing from the checkpoint: .*shortcut\.normalization\.running_var"):
        from_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="layer_type 'wide' is not one of basic, bottleneck"):
        from_config({**t.model.config.to_dict(), "layer_type": "wide"}, "image-classification")


def test_logical_axes_and_depth(tiny):
    model = from_pretrained(tiny("bottleneck", "image-classification", num_labels=4).path)
    params = flatten(split(model)[1])
    axes = flatten(logical_axes(model))
    conv = ("resnet", "encoder", "stages", 1, "layers", 0, "layer", 1, "convolution", "kernel")
    assert axes[conv] == (None, None, None, "embed") and params[conv].shape == (3, 3, 3, 3)
    assert axes[("resnet", "embedder", "embedder", "normalization", "scale")] == ("embed",)
    assert axes[("classifier", "kernel")] == ("embed", "classes")
    for path, names in axes.items():
        assert len(names) == params[path].ndim, path
    depth = flatten(depth_tree(get_family("resnet"), model.config, split(model)[1]))
    assert depth[("resnet", "embedder", "embedder", "convolution", "kernel")] == 0
    assert depth[("resnet", "encoder", "stages", 0, "layers", 0, "shortcut", "normalization", "bias")] == 1
    assert depth[conv] == 2
    assert depth[("classifier", "kernel")] == 3
    # the running statistics are BatchStats, not params: the optimizer never sees them
    stats = flatten(batch_stats(model))
    assert not set(stats) & set(params) and len(stats) == 3 * 12  # stem 1 + stage 0: 3 + shortcut + stage 1: 3 + shortcut + 3


def test_jaxtune_verify_compares_a_resnet_folder_with_transformers(tiny):
    from jaxtune.models.verify import verify

    task, diffs = verify(tiny("basic", "image-classification", num_labels=5, downsample_in_first_stage=True,
                              hidden_act="gelu").path, None)
    assert task == "image-classification" and set(diffs) >= {"logits"}
    assert all(d <= ATOL for d in diffs.values()) and diffs["logits"] > 0


@pytest.mark.parametrize("hw,edge", [((40, 50), 32), ((61, 37), 32), ((30, 44), 400)], ids=str)
def test_evaluation_preprocessing_equals_transformers_convnext_processor(hw, edge):
    """ResNet checkpoints ship ConvNext's processor: short side to size / crop_pct (bicubic), centre
    crop; at 384 and up a plain resize. jaxtune's evaluation pixels equal transformers' (PIL backend)."""
    from PIL import Image
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

    from jaxtune.data.image import ImageEncoder, ImageSettings

    processor = ConvNextImageProcessorPil(size={"shortest_edge": edge}, crop_pct=0.875,
                                          image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25])
    pixels = np.random.default_rng(0).integers(0, 256, (*hw, 3)).astype(np.uint8)
    ref = processor(Image.fromarray(pixels), return_tensors="np")["pixel_values"][0]
    settings = ImageSettings.from_any(processor.to_dict())
    assert settings.size == (edge, edge) and settings.resample == Image.BICUBIC
    ours = ImageEncoder(settings, 3)([{"image": pixels}])[0]
    assert ours.shape == ref.shape == (3, edge, edge)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
