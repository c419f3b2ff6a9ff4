"""The bundled recipe vit_fashion_mnist, run for a few steps on the real Fashion-MNIST (Debian
package dataset-fashion-mnist, which .ci/run installs): it trains, evaluates on the 10k test
images and exports. Missing files FAIL the test (with how to install them), they do not skip it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxtune.config import find_recipe, load_recipe

import _tiny_run as tr

FASHION = Path("/usr/share/datasets/fashion-mnist")
FILES = [f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]


def test_header_states_command_accuracy_and_time():
    lines = find_recipe("vit_fashion_mnist").read_text().splitlines()
    assert lines[0] == "# jaxtune run vit_fashion_mnist"
    header = "\n".join(l for l in lines if l.startswith("#"))
    assert "test accuracy" in header and "min" in header and "google/vit-base-patch16-224-in21k" in header
    r = load_recipe("vit_fashion_mnist")
    assert r.task == "image-classification" and r.model.path is None and r.model.config["model_type"] == "vit"
    assert r.data.test.startswith("idx:") and r.data.augment and r.data.hflip


def test_a_few_steps_on_the_real_fashion_mnist(tmp_path):
    missing = [f for f in FILES if not (FASHION / f).is_file()]
    if missing:
        pytest.fail(f"Fashion-MNIST is missing ({', '.join(missing)} in {FASHION}); install it with "
                    "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu)")
    # One CPU device, as the recipe's header was measured (the test session fakes eight).
    env = tr.one_device_env()
    proc = tr.cli("run", "vit_fashion_mnist", "train.steps=60", "train.eval_every=60", "train.log_every=20",
                  "data.validation_fraction=0.02", f"output_dir={tmp_path / 'run'}",
                  f"data.cache_dir={tmp_path / 'cache'}", env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    data = summary["data"]
    assert data["num_examples"] == {"train": 58800, "validation": 1200, "test": 10000}
    assert data["label_names"][:3] == ["T-shirt/top", "Trouser", "Pullover"] and len(data["label_names"]) == 10
    assert summary["steps"] == 60 and summary["test"]["accuracy"] > 0.45  # chance: 0.1; 0.596 measured
    config = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"] and config["num_channels"] == 1
    assert config["id2label"]["9"] == "Ankle boot"
    assert "test accuracy" in proc.stdout


HUB_ID = "google/vit-base-patch16-224-in21k"


def fake_hub_vit(cache: Path) -> Path:
    """A tiny random ViTModel filed in an HF cache under HUB_ID, with a ViT preprocessor config
    (224 x 224, mean = std = 0.5), standing in for the real checkpoint people download."""
    import torch
    from transformers import ViTConfig, ViTModel

    snapshot = cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / ("b" * 40)
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=16, num_channels=3)).save_pretrained(str(snapshot))
    (snapshot / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("b" * 40)
    return snapshot


def test_the_same_recipe_fine_tunes_a_pretrained_vit_from_the_hf_cache(tmp_path, monkeypatch):
    """The header's real use: model.path=google/vit-base-patch16-224-in21k (here a tiny stand-in in
    a local HF cache), its preprocessing (224 x 224, normalised, grayscale -> RGB) and a fresh head."""
    from huggingface_hub import constants

    from jaxtune.run.build import build_data, load_preprocessing

    missing = [f for f in FILES if not (FASHION / f).is_file()]
    if missing:
        pytest.fail(f"Fashion-MNIST is missing ({', '.join(missing)} in {FASHION}); install it with "
                    "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu)")
    snapshot = fake_hub_vit(tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    small = [f"data.train=idx:{FASHION}/t10k-images-idx3-ubyte.gz", "data.test=null",
             "data.validation_fraction=0.02", f"data.cache_dir={tmp_path / 'cache'}"]
    overrides = ["model.config={}", f"model.path={HUB_ID}", "data.image_size=224", *small]
    recipe = load_recipe("vit_fashion_mnist", overrides)
    _, images, _ = load_preprocessing(recipe)
    assert images["image_mean"] == [0.5, 0.5, 0.5]
    batch = next(build_data(recipe, None, images).eval_batches("validation"))
    assert batch["pixel_values"].shape[1:] == (3, 224, 224) and batch["pixel_values"].min() < -0.9  # (0 - .5) / .5

    env = {**tr.one_device_env(),
           "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = tr.cli("run", "vit_fashion_mnist", *overrides, "train.steps=2", "train.batch_size=8",
                  "train.eval_batch_size=40", f"output_dir={tmp_path / 'run'}", env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"from {HUB_ID}" in proc.stdout and "new: classifier" in proc.stdout
    export = tmp_path / "run" / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"] and config["image_size"] == 224
    assert json.loads((export / "preprocessor_config.json").read_text()) == \
        json.loads((snapshot / "preprocessor_config.json").read_text())
