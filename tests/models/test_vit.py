"""ViT: fp32 parity with transformers (PyTorch) for both heads, export round trips both ways, the
patch-convolution layout, input checks, logical axes, depth, `jaxtune verify`, the
image-classification task."""

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
    ("base", {"qkv_bias": False, "pooler_output_size": 7, "pooler_act": "relu", "hidden_act": "gelu"}),
    ("image-classification", {"num_labels": 5}),
    ("image-classification", {"num_labels": 3, "problem_type": "multi_label_classification"}),
]


@pytest.mark.parametrize("task,overrides", CASES, ids=lambda c: c if isinstance(c, str) else
                         "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_parity_with_transformers(tiny, task, overrides):
    t = tiny("vit", task, **overrides)
    batch = tg.pixel_batch()
    ref = tg.torch_forward(t.model, batch, output_hidden_states=True)
    out = from_pretrained(t.path, task=task)(**batch, output_hidden_states=True)
    # transformers' hidden_states: embeddings and each layer, before the final layernorm.
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert tg.max_diff(ours, theirs.numpy()) <= ATOL
    if task == "base":
        assert tg.max_diff(out.last_hidden_state, ref.last_hidden_state.numpy()) <= ATOL
        assert tg.max_diff(out.pooler_output, ref.pooler_output.numpy()) <= ATOL
        return
    assert out.pooler_output is None and np.abs(ref.logits.numpy()).max() > 0.05
    assert tg.max_diff(out.logits, ref.logits.numpy()) <= ATOL
    assert out.logits.shape == (3, overrides["num_labels"])
    # as usually called: the last layer runs for the CLS token only
    assert tg.max_diff(from_pretrained(t.path, task=task)(**batch).logits, ref.logits.numpy()) <= ATOL


def test_export_reloads_in_transformers_with_same_logits(tiny, tmp_path):
    import transformers

    hf_cfg = tiny("vit", "base").model.config.to_dict()
    model = from_config(hf_cfg, "image-classification", id2label=["shirt", "shoe", "bag"], seed=5)
    out_dir = save_pretrained(model, tmp_path / "e")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"] and config["image_size"] == [12, 8]
    theirs = transformers.AutoModelForImageClassification.from_pretrained(str(out_dir)).eval()
    assert theirs.config.id2label == {0: "shirt", 1: "shoe", 2: "bag"}
    batch = tg.pixel_batch(seed=1)
    ref = tg.torch_forward(theirs, batch).logits.numpy()
    assert np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(np.asarray(model(**batch).logits), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task", ["base", "image-classification"])
def test_transformers_to_jaxtune_to_disk_is_bit_identical(tiny, tmp_path, task):
    from safetensors.numpy import load_file

    t = tiny("vit", task, **({"num_labels": 5} if task != "base" else {}))
    first = from_pretrained(t.path)
    save_pretrained(first, tmp_path / "a")
    second = from_pretrained(tmp_path / "a")
    a, b = flatten(split(first)[1]), flatten(split(second)[1])
    assert a.keys() == b.keys()
    for path in a:
        assert np.array_equal(np.asarray(a[path]), np.asarray(b[path])), path
    orig, exported = load_file(t.path / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors")
    assert set(exported) == set(orig)
    for key, value in exported.items():
        assert np.array_equal(orig[key], value), key
    # The patch conv: torch (D, C, ph, pw) <-> flax (ph, pw, C, D).
    prefix = "vit." if task != "base" else ""
    base = first.vit if task != "base" else first
    kernel = np.asarray(base.embeddings.patch_embeddings.projection.kernel[...])
    assert kernel.shape == (4, 4, 2, 30)
    np.testing.assert_array_equal(kernel.transpose(3, 2, 0, 1),
                                  orig[prefix + "embeddings.patch_embeddings.projection.weight"])


def test_base_checkpoint_gets_a_fresh_classifier(tiny):
    t = tiny("vit", "base")
    model, info = from_pretrained(t.path, task="image-classification", num_labels=4, output_loading_info=True)
    assert sorted(info["fresh"]) == [("classifier", "bias"), ("classifier", "kernel")]
    assert sorted(info["unexpected_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    ref = tg.torch_forward(t.model, tg.pixel_batch(), output_hidden_states=True)
    out = model(**tg.pixel_batch(), output_hidden_states=True)
    assert tg.max_diff(out.hidden_states[-1], ref.hidden_states[-1].numpy()) <= ATOL


def test_bad_inputs_are_one_line_errors(tiny):
    model = from_pretrained(tiny("vit", "image-classification", num_labels=5).path)
    for kwargs, needle in (
        (tg.pixel_batch(hw=(16, 8)), "16x8"),
        (tg.pixel_batch(channels=3), "3 channels"),
        ({**tg.pixel_batch(), "interpolate_pos_encoding": True}, "interpolate_pos_encoding"),
        ({}, "pixel_values"),
    ):
        with pytest.raises(JaxtuneError, match=needle) as e:
            model(**kwargs)
        assert "\n" not in str(e.value)


def test_logical_axes_and_depth(tiny):
    model = from_pretrained(tiny("vit", "image-classification", num_labels=5).path)
    params = flatten(split(model)[1])
    axes = flatten(logical_axes(model))
    emb = ("vit", "embeddings")
    layer = ("vit", "encoder", "layer", 1)
    assert axes[emb + ("cls_token",)] == (None, None, "embed")
    assert axes[emb + ("position_embeddings",)] == (None, "position", "embed")
    assert axes[emb + ("patch_embeddings", "projection", "kernel")] == (None, None, None, "embed")
    assert axes[layer + ("attention", "attention", "query", "kernel")] == ("embed", "heads")
    assert axes[layer + ("attention", "output", "dense", "kernel")] == ("heads", "embed")
    assert axes[layer + ("intermediate", "dense", "kernel")] == ("embed", "mlp")
    assert axes[layer + ("output", "dense", "kernel")] == ("mlp", "embed")
    assert axes[("classifier", "kernel")] == ("embed", "classes")
    for path, names in axes.items():
        assert len(names) == params[path].ndim, path
    depth = flatten(depth_tree(get_family("vit"), model.config, split(model)[1]))
    assert depth[emb + ("cls_token",)] == depth[emb + ("patch_embeddings", "projection", "bias")] == 0
    assert depth[("vit", "encoder", "layer", 0, "layernorm_before", "scale")] == 1
    assert depth[layer + ("output", "dense", "kernel")] == 2
    assert depth[("vit", "layernorm", "scale")] == depth[("classifier", "kernel")] == 3


def test_verify_cli(tiny):
    from click.testing import CliRunner

    from jaxtune.cli import main

    for task, extra in (("base", {}), ("image-classification", {"num_labels": 5})):
        result = CliRunner().invoke(main, ["verify", str(tiny("vit", task, **extra).path), "--batch", "3"])
        assert result.exit_code == 0, result.output
        assert f"task {task}" in result.output
        names = {line.split()[0] for line in result.output.splitlines() if "max abs diff" in line}
        assert names == ({"last_hidden_state", "pooler_output"} if task == "base" else {"logits", "last_hidden_state"})


def test_image_classification_task_is_sequence_classifications_loss():
    from jaxtune.tasks.image_classification import ImageClassification, make
    from jaxtune.tasks.sequence_classification import SequenceClassification

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    batch = {"labels": np.array([0, 1, 2, 3, 1, 1]), "weights": np.array([1, 1, 1, 1, 1, 0], np.float32)}
    task = make(type("C", (), {"num_labels": 4, "problem_type": None})())
    assert isinstance(task, ImageClassification) and task.name == task.head == "image-classification"
    seq = SequenceClassification(num_labels=4)
    loss, aux = task.loss(logits, batch)
    assert float(loss) == pytest.approx(float(seq.loss(logits, batch)[0]))
    # by hand: weighted cross-entropy over the 5 real rows
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert float(loss) == pytest.approx(-np.mean(logp[np.arange(5), batch["labels"][:5]]), rel=1e-5)
    m = task.metrics({k: np.asarray(v, np.float64) for k, v in task.outputs(logits, batch).items()})
    pred = logits.argmax(-1)[:5]
    assert m["accuracy"] == pytest.approx(np.mean(pred == batch["labels"][:5]))
    assert set(m) == {"loss", "accuracy", "macro_f1"}
