"""BatchNorm running statistics in TrainState.model_state (ResNet): train-mode steps update them
exactly as PyTorch's train-mode forward does (momentum, unbiased running variance,
num_batches_tracked) and normalise by the batch's statistics; frozen BatchNorm normalises by the
running ones and leaves them alone; 8 fake devices give the statistics of one (the GLOBAL batch's);
a recipe run checkpoints them (a resumed run, with on-device augmentation, ends bit-identical to an
uninterrupted one) and exports them (transformers reloads the export with jaxtune's logits; the
run folder loads with the checkpoint's statistics)."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import optax
import pytest
import yaml
from jax.sharding import PartitionSpec as P

from jaxtune import parallel
from jaxtune.config import MeshConfig, load_recipe
from jaxtune.inference import load
from jaxtune.models import flatten, from_config, from_pretrained, path_str, split
from jaxtune.models.trees import batch_stats
from jaxtune.run import run
from jaxtune.tasks.model_fns import make_batch_stats_loss_fn
from jaxtune.train import init_state, make_train_step

import _tiny_resnet as tr

MOMENTUM = 0.3


def torch_train_mode(model, batches):
    """PyTorch's train-mode forward over `batches`: the loss of each, then the buffers."""
    import torch

    model.train()
    losses = []
    with torch.no_grad():
        for b in batches:
            logits = model(pixel_values=torch.from_numpy(b["pixel_values"])).logits
            losses.append(float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(b["labels"]).long())))
    model.eval()
    return losses, {k: v.numpy().copy() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}


def labelled(seed: int, n: int = 6) -> dict:
    b = tr.pixel_batch(batch=n, seed=seed)
    b["labels"] = np.random.default_rng(seed).integers(0, 4, n).astype(np.int32)
    return b


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A bottleneck ResNet head with perturbed weights and statistics, BatchNorm momentum 0.3."""
    import torch

    model = tr.build_hf_model("bottleneck", "image-classification", num_labels=4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = MOMENTUM
    path = tmp_path_factory.mktemp("resnet-bn")
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("freeze", [False, True], ids=["train-mode", "frozen"])
def test_steps_update_statistics_as_pytorch_train_mode(checkpoint, freeze):
    import copy

    path, hf = checkpoint
    batches = [labelled(1), labelled(2)]
    ours = from_pretrained(path, config_overrides={"batch_norm_momentum": MOMENTUM})
    start = {path_str(p): np.asarray(v) for p, v in flatten(batch_stats(ours)).items()}
    step = jax.jit(make_train_step(make_batch_stats_loss_fn(ours, freeze_batchnorm=freeze), optax.sgd(0.0),
                                   has_model_state=True))
    state = init_state(split(ours)[1], jax.random.PRNGKey(0), batch_stats(ours), tx=optax.sgd(0.0))
    losses = []
    for b in batches:
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    got = {path_str(p).replace("/", "."): np.asarray(v) for p, v in flatten(state.model_state).items()}
    reference = copy.deepcopy(hf)
    if freeze:  # eval-mode forward: the running statistics normalise and stay as they were
        want_losses = [torch_eval_loss(reference, b) for b in batches]
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
        for key, value in got.items():
            np.testing.assert_array_equal(value, start[key.replace(".", "/")], err_msg=key)
        return
    want_losses, buffers = torch_train_mode(reference, batches)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert set(got) == {k.replace("resnet.", "resnet.", 1) for k in buffers}
    for key, value in buffers.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert int(got["resnet.embedder.embedder.normalization.num_batches_tracked"]) == 7 + 2
    moved = np.abs(got["resnet.embedder.embedder.normalization.running_var"]
                   - start["resnet/embedder/embedder/normalization/running_var"]).max()
    assert moved > 1e-3  # the statistics did move, so the comparison means something


def torch_eval_loss(model, b) -> float:
    import torch

    with torch.no_grad():
        logits = model.eval()(pixel_values=torch.from_numpy(b["pixel_values"])).logits
        return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(b["labels"]).long()))


SHARDED = dict(model_type="resnet", num_channels=2, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
               layer_type="basic", num_labels=4)


def train_on(plan, batches):
    model = from_config(dict(SHARDED), "image-classification", shardings=plan.param_shardings)
    tx = optax.adamw(1e-2)
    state = plan.create_state(split(model)[1], tx, rng=0, model_state=batch_stats(model))
    step = plan.jit_train_step(make_train_step(make_batch_stats_loss_fn(model), tx, has_model_state=True), state)
    for b in batches:
        state, metrics = step(state, plan.shard_batch(b))
        float(metrics["loss"])
    return state


def test_eight_devices_give_the_global_batch_statistics_of_one():
    batches = [labelled(s, n=16) for s in range(3)]
    one = train_on(parallel.Plan.from_config(None, devices=jax.devices()[:1], data=1), batches)
    eight = train_on(parallel.Plan.from_config(MeshConfig(data=4, fsdp=2)), batches)
    got, want = flatten(jax.device_get(eight.model_state)), flatten(jax.device_get(one.model_state))
    assert len(want) == 3 * 6
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-5, err_msg=path_str(path))
    assert int(want[("resnet", "embedder", "embedder", "normalization", "num_batches_tracked")]) == 3
    for path, x in flatten(eight.model_state).items():
        assert x.sharding.spec == P(), path_str(path)  # replicated: one copy of the global statistics
    params = flatten(eight.params)
    conv = ("resnet", "encoder", "stages", 1, "layers", 0, "layer", 0, "convolution", "kernel")
    assert params[conv].sharding.spec == P(None, None, None, "fsdp")
    want_params = flatten(jax.device_get(one.params))
    for path, x in params.items():
        np.testing.assert_allclose(np.asarray(x), want_params[path], rtol=1e-4, atol=1e-5, err_msg=path_str(path))


def test_freeze_batchnorm_on_a_model_without_batchnorm_is_one_line(tmp_path):
    from jaxtune.errors import ConfigError
    from jaxtune.run.build import check_model

    recipe = tmp_path / "vit.yaml"
    recipe.write_text(yaml.safe_dump({"task": "image-classification", "model": {"freeze_batchnorm": True, "config": {
        "model_type": "vit", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "image_size": 8, "patch_size": 4}}}))
    with pytest.raises(ConfigError, match=r"^model.freeze_batchnorm: vit models have no BatchNorm \(model.config\)$"):
        check_model(load_recipe(recipe))
    check_model(load_recipe(recipe, ["model.config={model_type: resnet}"]))  # a ResNet has BatchNorm


def test_a_recipe_run_checkpoints_resumes_and_exports_the_statistics(tmp_path):
    import torch
    import transformers

    recipe = tmp_path / "resnet.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "image-classification",
        "model": {"config": {"model_type": "resnet", "num_channels": 1, "embedding_size": 8,
                             "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}},
        "data": {"train": f"images:{tr.image_folder(tmp_path / 'images')}", "validation_fraction": 0.0,
                 # soft labels from smoothing (mixup / cutmix draws are keyed the same way: test_augment)
                 "augment": {"crop_scale": [0.5, 1.0], "hflip": True, "label_smoothing": 0.1},
                 "cache_dir": str(tmp_path / "cache")},
        # no validation: nothing but the train step compiles
        "optim": {"name": "adamw", "lr": 0.01, "schedule": "constant"},
        "train": {"batch_size": 8, "steps": 4, "seed": 3},
        "checkpoint": {"every": 2},
        "mesh": {"data": -1},  # the session's 8 fake devices: one image each
    }))
    straight = run(load_recipe(recipe, [f"output_dir={tmp_path / 'a'}"]))
    # the same run stopped after step 2: its folder as it was then (the step-4 checkpoint and the
    # results gone), resumed
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "b" / "export")
    (tmp_path / "b" / "summary.json").unlink()
    resumed = run(load_recipe(recipe, [f"output_dir={tmp_path / 'b'}"]))
    assert resumed["resumed_from"] == 2 and straight["steps"] == resumed["steps"] == 4
    from safetensors.numpy import load_file

    a, b = load_file(tmp_path / "a" / "export" / "model.safetensors"), load_file(tmp_path / "b" / "export" / "model.safetensors")
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert a["resnet.embedder.embedder.normalization.num_batches_tracked"] == 4  # trained statistics
    assert np.abs(a["resnet.embedder.embedder.normalization.running_var"] - 1).max() > 1e-3
    config = json.loads((tmp_path / "a" / "export" / "config.json").read_text())
    assert config["architectures"] == ["ResNetForImageClassification"] and config["id2label"] == {"0": "br", "1": "tl"}
    theirs = transformers.AutoModelForImageClassification.from_pretrained(str(tmp_path / "a" / "export")).eval()
    pixels = np.random.default_rng(0).normal(size=(3, 1, 12, 12)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    ours = from_pretrained(tmp_path / "a" / "export")(pixel_values=pixels).logits
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)
    # the run folder itself (jaxtune eval / export / predict RUN): its checkpoint's statistics too
    from_run = load(tmp_path / "a").model(pixel_values=pixels).logits
    np.testing.assert_allclose(np.asarray(from_run), np.asarray(ours), atol=1e-6)
    # an older checkpoint's statistics come with its params (what an export of the best step reads)
    stem = load(tmp_path / "b", step=2).model.resnet.embedder.embedder.normalization
    assert int(stem.num_batches_tracked[...]) == 2
    assert not np.allclose(np.asarray(stem.running_var[...]), a["resnet.embedder.embedder.normalization.running_var"])
