"""timm checkpoints (ResNet and VGG): jaxtune loads the folders timm saves and matches timm's
PyTorch models (fp32 logits and features in eval mode; logits and BatchNorm running statistics
in train mode), a timm ResNet is transformers' ResNet with renamed weights (and loads into the
same jaxtune parameters either way), every VGG and standard ResNet layout has timm's keys and
shapes, exports are folders timm reloads with the same logits, the evaluation preprocessing comes
from `pretrained_cfg`, a recipe trains on a timm folder end to end (run, export, eval, predict), and
variants jaxtune cannot build are one-line errors. timm is the reference: `_tiny_timm`."""

from __future__ import annotations

import copy
import functools
import json
import math
import re

import jax
import numpy as np
import pytest
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image
from safetensors.numpy import load_file

from jaxtune import parallel
from jaxtune.config import MeshConfig, load_recipe
from jaxtune.data.image import ImageSettings, image_settings_from_model
from jaxtune.errors import ModelLoadError
from jaxtune.inference import evaluate_path, export_run, load, predict
from jaxtune.models import (
    abstract_model, depth_tree, export_tensors, flatten, from_pretrained, get_family, hf, save_pretrained, split,
    unflatten,
)
from jaxtune.models.resnet.conv import adaptive_avg_pool
from jaxtune.models.trees import batch_stats
from jaxtune.models.vgg.modeling import LAYOUTS, VGGConfig
from jaxtune.run import run

import _tiny_resnet as tr
import _tiny_timm as tt

REL = 1e-4  # fp32 parity, relative to the largest reference value (at least 1)


def close(ours, theirs, rel: float = REL) -> bool:
    return tt.max_diff(ours, theirs) <= rel * max(1.0, float(np.abs(theirs).max()))


@functools.partial(nnx.jit, static_argnames=("deterministic",))
def forward(model, x, deterministic: bool = True):
    """A jaxtune model's output, compiled whole (faster here than op by op; BatchNorm's train-mode
    updates land in `model` as in an eager call)."""
    return model(pixel_values=x, deterministic=deterministic)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tt.Factory(tmp_path_factory)


# name -> model_args: basic and bottleneck ResNets, VGGs with and without BatchNorm. (vgg13/16/19
# differ from vgg11 in their layout only, which the layout tests check for every depth; a full-size
# vgg16_bn at 224 pixels matched timm to 6e-6 too, 17 s with timm's init and save: not kept here.)
CASES = {
    "resnet18": tt.SMALL_RESNET,
    "resnet50": tt.SMALL_BOTTLENECK,
    "vgg11": tt.SMALL_VGG,
    "vgg11_bn": tt.SMALL_VGG,
}


def timm_features(model, x):
    """What jaxtune's base model returns as last_hidden_state: timm's features, and for VGG the
    pre_logits ConvMlp's output."""
    feats = model.forward_features(x)
    return model.pre_logits(feats) if hasattr(model, "pre_logits") else feats


@pytest.mark.parametrize("name", CASES)
def test_logits_and_features_match_timm(tiny, name):
    t = tiny(name, **CASES[name])
    x = tt.pixels()
    ref = tt.torch_forward(t.model, x)
    assert np.abs(ref).max() > 0.3  # logits that a wrong weight would change
    model = from_pretrained(t.path)
    assert model.config.model_type == ("timm_vgg" if name.startswith("vgg") else "timm_resnet")
    logits = forward(model, x).logits
    assert logits.shape == ref.shape == (2, 3)
    assert close(logits, ref), tt.max_diff(logits, ref)
    base = from_pretrained(t.path, task="base")  # the network without its classifier
    features = tt.torch_forward(lambda v: timm_features(t.model, v), x)
    out = forward(base, x)
    assert out.last_hidden_state.shape == features.shape
    assert close(out.last_hidden_state, features), tt.max_diff(out.last_hidden_state, features)
    assert close(out.pooler_output[:, :, 0, 0], features.mean(axis=(2, 3)))


@pytest.mark.parametrize("in_hw,out_hw", [((1, 1), (7, 7)), ((2, 3), (7, 7)), ((5, 9), (7, 9)), ((7, 7), (7, 7))])
def test_adaptive_average_pool_is_pytorchs_also_upward(in_hw, out_hw):
    import torch

    x = np.random.default_rng(7).normal(size=(2, *in_hw, 3)).astype(np.float32)  # NHWC
    ours = adaptive_avg_pool(x, out_hw)
    theirs = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), out_hw)
    assert tt.max_diff(ours, theirs.permute(0, 2, 3, 1).numpy()) < 1e-6


def test_vgg_head_on_a_map_under_7_pixels_high_and_over_7_wide(tiny):
    """64 x 288 pixels: features 2 x 9, pooled up to 7 x 9, fc1's output 1 x 3, averaged."""
    t = tiny("vgg11", **CASES["vgg11"])
    x = np.random.default_rng(8).normal(size=(1, 3, 64, 288)).astype(np.float32)
    ref = tt.torch_forward(t.model, x)
    assert close(forward(from_pretrained(t.path), x).logits, ref)


@pytest.mark.parametrize("name", ["resnet50", "vgg11_bn"])
def test_train_mode_matches_pytorch_logits_and_running_statistics(tiny, name):
    """BatchNorm in train mode: normalised by the batch, running statistics moved with momentum
    0.1 (unbiased variance) and counted, as PyTorch's train-mode forward does."""
    t = tiny(name, **CASES[name])
    x = tt.pixels(batch=4, seed=1)
    model = from_pretrained(t.path)
    before = {k: v.copy() for k, v in export_tensors(model).items()}
    ours = np.asarray(forward(model, x, deterministic=False).logits)
    theirs_model = copy.deepcopy(t.model)  # train mode changes its buffers
    theirs_model.train()
    theirs = tt.torch_forward(theirs_model, x)
    assert close(ours, theirs, 1e-3), tt.max_diff(ours, theirs)
    assert not close(ours, tt.torch_forward(t.model, x), 1e-2)  # train mode is not eval mode here
    after, expected = export_tensors(model), {k: v.numpy() for k, v in theirs_model.state_dict().items()}
    stats = [k for k in expected if re.search(r"running_(mean|var)$", k)]
    assert stats and set(after) == set(expected)
    for k in stats:
        assert not np.allclose(after[k], before[k])
        np.testing.assert_allclose(after[k], expected[k], rtol=1e-3, atol=1e-4, err_msg=k)
    for k in (k for k in expected if k.endswith("num_batches_tracked")):
        assert after[k] == expected[k] == 8 and after[k].dtype == np.int64


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "vgg11_bn"])
def test_export_is_a_folder_timm_reloads_with_the_same_logits(tiny, tmp_path, name):
    """Class names and changed statistics: timm's `local-dir:` loader (strict, so every key and
    shape must be timm's) gives jaxtune's logits; the config keeps the source's preprocessing and
    model_args and names the classes. (A new head's export: the recipe test below.)"""
    t = tiny(name, **CASES[name])
    labels = ["ant", "bee", "cat"]
    model = from_pretrained(t.path, id2label=labels)
    stats = {p: v * 1.5 if p[-1] == "running_var" else v for p, v in flatten(batch_stats(model)).items()}
    nnx.update(model, unflatten(stats))
    out = save_pretrained(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 3 and config["label_names"] == labels
    assert config["model_args"]["num_classes"] == config["pretrained_cfg"]["num_classes"] == 3
    assert {k: v for k, v in config["model_args"].items() if k in CASES[name]} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in CASES[name].items()}
    for key in ("mean", "std", "input_size", "interpolation", "crop_pct"):
        assert config["pretrained_cfg"][key] == t.config["pretrained_cfg"][key]
    assert "model_type" not in config  # timm's format, not transformers'
    theirs = tt.load_exported(out)
    x = tt.pixels(seed=2)
    ref = tt.torch_forward(theirs, x)
    ours = forward(model, x).logits
    assert ref.shape == (2, 3) and np.abs(ref).max() > 0.3 and close(ours, ref), tt.max_diff(ours, ref)
    assert close(forward(from_pretrained(out), x).logits, ref)  # and jaxtune reads its own export
    if stats:
        key = next(k for k in theirs.state_dict() if k.endswith("running_var"))
        np.testing.assert_allclose(theirs.state_dict()[key].numpy(), 1.5 * t.model.state_dict()[key].numpy(),
                                   rtol=1e-6)


def test_vgg_shards_over_fsdp_and_data_with_one_devices_logits(tiny):
    """Loaded straight onto a data=2 x fsdp=4 mesh (channels over fsdp: fc1's 64 outputs, the
    convolutions' widths): the logits of one device. (BatchNorm2d is the ResNet's, whose sharded
    train-mode statistics tests/test_batchnorm.py checks.)"""
    t = tiny("vgg11_bn", **CASES["vgg11_bn"])
    plan = parallel.Plan.from_config(MeshConfig(data=2, fsdp=4))
    sharded = from_pretrained(t.path, shardings=plan.param_shardings)
    assert sharded.vgg.pre_logits.fc1.kernel[...].sharding.spec == P(None, None, None, "fsdp")
    x = tt.pixels(batch=8, seed=6)  # one image per device
    batch = jax.device_put(x, NamedSharding(plan.mesh, P(("data", "fsdp"))))
    assert close(forward(sharded, batch).logits, tt.torch_forward(t.model, x))


def test_base_network_exports_with_num_classes_zero(tiny, tmp_path):
    t = tiny("resnet50", **CASES["resnet50"])
    base = from_pretrained(t.path, task="base")
    out = save_pretrained(base, tmp_path / "base")
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 0 and "label_names" not in config
    assert not any(k.startswith("fc.") for k in load_file(out / "model.safetensors"))
    theirs = tt.load_exported(out)
    x = tt.pixels(seed=3)
    pooled = tt.torch_forward(theirs, x)  # timm without a classifier: the pooled features
    assert close(forward(base, x).pooler_output[:, :, 0, 0], pooled)


# timm key -> transformers' ResNet key, written out here independently of jaxtune's tables
TIMM_TO_TRANSFORMERS = (
    (r"^conv1\.", lambda m: "resnet.embedder.embedder.convolution."),
    (r"^bn1\.", lambda m: "resnet.embedder.embedder.normalization."),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"resnet.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer."
                                                 f"{int(m[3]) - 1}.convolution."),
    (r"^layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"resnet.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer."
                                               f"{int(m[3]) - 1}.normalization."),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"resnet.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}."
                                                      "shortcut.convolution."),
    (r"^layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"resnet.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}."
                                                      "shortcut.normalization."),
    (r"^fc\.", lambda m: "classifier.1."),
)


def to_transformers(key: str) -> str:
    for pattern, repl in TIMM_TO_TRANSFORMERS:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    raise AssertionError(f"no transformers key for timm's {key}")


@pytest.mark.parametrize("name,block", [("resnet18", "basic"), ("resnet50", "bottleneck")])
def test_timm_resnet_is_transformers_resnet_with_other_names(tiny, tmp_path, name, block):
    """timm's weights in transformers' ResNetForImageClassification give timm's logits, and jaxtune
    reads the two folders into the same parameters and statistics (its two key tables agree)."""
    import torch
    import transformers

    t = tiny(name, **CASES[name])
    expansion = 1 if block == "basic" else 4
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=64, hidden_sizes=[c * expansion for c in tt.SMALL_RESNET["channels"]],
        depths=[len(getattr(t.model, f"layer{i}")) for i in range(1, 5)], layer_type=block, num_labels=3)
    theirs = transformers.ResNetForImageClassification(config).eval()
    theirs.load_state_dict({to_transformers(k): v for k, v in t.model.state_dict().items()}, strict=True)
    x = tt.pixels(seed=4)
    with torch.no_grad():
        hf_logits = theirs(pixel_values=torch.from_numpy(x)).logits.numpy()
    assert close(hf_logits, tt.torch_forward(t.model, x))
    theirs.save_pretrained(tmp_path / "hf")
    from_timm, from_hf = from_pretrained(t.path), from_pretrained(tmp_path / "hf")
    assert from_hf.config.model_type == "resnet" and from_timm.config.model_type == "timm_resnet"
    a = {**flatten(split(from_timm)[1]), **flatten(batch_stats(from_timm))}
    b = {**flatten(split(from_hf)[1]), **flatten(batch_stats(from_hf))}
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=str(path))
    assert close(forward(from_timm, x).logits, hf_logits)


def timm_layout(name: str) -> dict:
    """timm's state-dict keys and shapes, from a model on the meta device (no memory, no init)."""
    timm = tt.import_timm()
    return {k: tuple(v.shape) for k, v in timm.create_model(name, num_classes=3, device="meta").state_dict().items()}


def jaxtune_layout(config, task: str = "image-classification") -> dict:
    """The keys and shapes (PyTorch layout) a jaxtune model of `config` exports, computed abstractly."""
    family = get_family(config.model_type)
    model = abstract_model(family.head(task), config)
    out = {}
    for path, leaf in {**flatten(split(model)[1]), **flatten(batch_stats(model))}.items():
        key, to_hf, _ = family.to_hf_key("/".join(map(str, path)))
        out[key] = tuple(to_hf(np.broadcast_to(np.zeros((), np.int8), leaf.shape)).shape)
    return out


@pytest.mark.parametrize("depth", sorted(LAYOUTS))
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
def test_every_vgg_layout_has_timms_keys_and_shapes(depth, bn):
    name = f"vgg{depth}" + ("_bn" if bn else "")
    assert jaxtune_layout(VGGConfig(depth=depth, batch_norm=bn, num_labels=3)) == timm_layout(name)


def test_vgg_layerwise_depth_counts_convolutions():
    """Depth for layer-wise LR decay / gradual unfreezing: the i-th convolution and its BatchNorm
    are at depth i, the head (pre_logits, classifier) above the last one."""
    config = VGGConfig(depth=11, batch_norm=True, num_labels=3)
    model = abstract_model(get_family("timm_vgg").head("image-classification"), config)
    depths = {"/".join(map(str, p)): d for p, d in flatten(depth_tree(get_family("timm_vgg"), config,
                                                                       split(model)[1])).items()}
    # vgg11_bn: features 0 conv, 1 BN, 2 ReLU, 3 pool, 4 conv (the second), ...
    assert depths["vgg/features/0/kernel"] == depths["vgg/features/1/scale"] == 1
    assert depths["vgg/features/4/kernel"] == 2
    assert depths["vgg/pre_logits/fc1/kernel"] == depths["classifier/kernel"] == config.num_conv_layers + 1 == 9


@pytest.mark.parametrize("name", ["resnet18", "resnet26", "resnet34", "resnet101", "resnet152", "resnet200"])
def test_every_standard_resnet_layout_has_timms_keys_and_shapes(tmp_path, name):
    """Each name's config (as jaxtune reads timm's config.json) builds timm's layout."""
    (tmp_path / "config.json").write_text(json.dumps({"architecture": name, "num_classes": 3,
                                                      "pretrained_cfg": {}}))
    hf_config = hf.read_config(tmp_path)
    family = get_family(hf_config["model_type"])
    assert jaxtune_layout(family.config_cls.from_hf(hf_config)) == timm_layout(name)


UNSUPPORTED = [  # (architecture, model_args, what the message must name)
    ("resnet50d", {}, "deep stem"),
    ("resnet26t", {}, "tiered deep stem"),
    ("resnet50c", {}, "deep stem"),
    ("resnext50_32x4d", {}, "grouped convolutions"),
    ("seresnet50", {}, "attention"),
    ("wide_resnet50_2", {}, "base_width 128"),
    ("resnetblur50", {}, "anti-aliased"),
    ("resnet50_gn", {}, "GroupNorm"),
    ("resnet50", {"avg_down": True}, "avg_down=True"),
    ("resnet50", {"cardinality": 32}, "cardinality=32"),
    ("resnet50", {"stem_type": "deep"}, "stem_type='deep'"),
    ("resnet18", {"drop_path_rate": 0.1}, "drop_path_rate=0.1"),
    ("resnet18", {"block": "SEBlock"}, "block='SEBlock'"),
    ("resnet18", {"some_new_arg": 1}, "some_new_arg=1"),
    ("vgg16", {"norm_layer": "batchnorm2d"}, "norm_layer='batchnorm2d'"),
    ("vgg16_bn", {"act_layer": "gelu"}, "act_layer='gelu'"),
    ("vgg16_gn", {}, "vgg11/13/16/19"),
    ("vit_base_patch16_224", {}, "resnet18"),
]


@pytest.mark.parametrize("arch,model_args,what", UNSUPPORTED, ids=[f"{a}-{'-'.join(m) or 'plain'}"
                                                                   for a, m, _ in UNSUPPORTED])
def test_unsupported_variants_are_one_line_errors(tmp_path, arch, model_args, what):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 3,
                                                      "model_args": model_args, "pretrained_cfg": {}}))
    with pytest.raises(ModelLoadError) as e:
        from_pretrained(tmp_path)
    message = str(e.value)
    assert "\n" not in message and (f"'{arch}'" in message or f"timm {arch} " in message)
    assert what in message and str(tmp_path / "config.json") in message


def test_global_pool_other_than_average_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3,
                                                      "global_pool": "max", "pretrained_cfg": {}}))
    with pytest.raises(ModelLoadError, match=r"resnet18 with global_pool 'max' is not supported"):
        from_pretrained(tmp_path)


def test_evaluation_preprocessing_comes_from_pretrained_cfg(tiny):
    """As timm evaluates: the short side to size / crop_pct, a centre crop, its interpolation,
    its mean and std."""
    t = tiny("resnet18")
    pre = t.config["pretrained_cfg"]
    settings = ImageSettings.from_any(image_settings_from_model(t.path))
    _, h, w = pre["input_size"]
    assert settings.size == (h, w) and settings.crop_pct == pre["crop_pct"]
    assert settings.mean == tuple(pre["mean"]) and settings.std == tuple(pre["std"])
    assert settings.resample == {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[pre["interpolation"]]
    im = Image.new("RGB", (w * 2, h))  # short side h: resized to int(h / crop_pct), then cropped to h x w
    assert settings.fit(im).size == (w, h)


def test_a_recipe_trains_a_timm_folder_and_exports_one_timm_reloads(tmp_path):
    """`model.path` a timm folder (5 ImageNet-style classes, 16-pixel input_size in its
    pretrained_cfg): the run trains a new 2-label head and the BatchNorm statistics; its export/,
    and `jaxtune export` of the run, are timm folders timm reloads with the run's logits; eval and
    predict read the folder's preprocessing."""
    source = tt.save(tt.build("resnet18", num_classes=5, pretrained_cfg_overlay={"input_size": (3, 16, 16)},
                              **tt.SMALL_RESNET), tmp_path / "timm")
    assert json.loads((source / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 16, 16]
    images = tr.image_folder(tmp_path / "images", per_class=8)
    recipe = tmp_path / "timm.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "image-classification",
        "model": {"path": str(source)},
        "data": {"train": f"images:{images}", "validation_fraction": 0.0, "cache_dir": str(tmp_path / "cache")},
        "optim": {"name": "adamw", "lr": 0.01, "schedule": "constant"},
        "train": {"batch_size": 8, "steps": 3, "seed": 0},
        "mesh": {"data": -1},  # the 8 fake devices: one image each
    }))
    summary = run(load_recipe(recipe, [f"output_dir={tmp_path / 'run'}"]))
    assert summary["steps"] == 3
    export = tmp_path / "run" / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["label_names"] == ["br", "tl"]
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16]
    tensors = load_file(export / "model.safetensors")
    start = load_file(source / "model.safetensors")["bn1.num_batches_tracked"]
    assert tensors["bn1.num_batches_tracked"] == start + 3  # trained statistics, under timm's names
    theirs = tt.load_exported(export)
    x = np.random.default_rng(5).normal(size=(3, 3, 16, 16)).astype(np.float32)
    ref = tt.torch_forward(theirs, x)
    assert close(forward(load(tmp_path / "run").model, x).logits, ref)  # the run's checkpoint
    again = export_run(tmp_path / "run", tmp_path / "again").model  # `jaxtune export RUN OUT`
    assert close(forward(again, x).logits, ref)
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == config
    what, n, metrics, _ = evaluate_path(export, data=f"images:{images}")  # `jaxtune eval` of the export
    assert n == 16 and 0 <= metrics["accuracy"] <= 1
    paths = [str(p) for p in sorted(images.glob("*/0.png"))]
    predictions = predict(load(export), paths)  # `jaxtune predict EXPORT IMAGE...`
    assert [p["input"] for p in predictions] == paths
    probs = np.array([[p["probabilities"][n] for n in ("br", "tl")] for p in predictions])
    logits = tt.torch_forward(theirs, np.stack([timm_eval_pixels(p, config["pretrained_cfg"]) for p in paths]))
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-5)  # timm's preprocessing, timm's model


def timm_eval_pixels(path: str, pre: dict) -> np.ndarray:
    """timm's evaluation transform (`transforms_factory`, crop_mode center), written out with PIL
    as torchvision applies it to PIL images: short side to floor(size / crop_pct), centre crop,
    [0, 1], normalise."""
    _, h, w = pre["input_size"]
    im = Image.open(path).convert("RGB")
    short = math.floor(h / pre["crop_pct"])
    size = (short, int(short * im.height / im.width)) if im.width <= im.height else \
        (int(short * im.width / im.height), short)
    im = im.resize(size, {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[pre["interpolation"]])
    top, left = int(round((im.height - h) / 2.0)), int(round((im.width - w) / 2.0))
    a = np.asarray(im.crop((left, top, left + w, top + h)), np.float32).transpose(2, 0, 1) / 255.0
    return ((a - np.reshape(pre["mean"], (3, 1, 1))) / np.reshape(pre["std"], (3, 1, 1))).astype(np.float32)
