"""timm checkpoint folders, read as jaxtune reads an HF folder and written back in timm's format.

A timm folder is what `timm.models.save_for_hf` (and `push_to_hf_hub`) writes: `model.safetensors`
(timm's state dict) and a config.json holding `architecture` (no `model_type`), `num_classes`,
`num_features`, `pretrained_cfg` (preprocessing: `input_size`, `mean`, `std`, `interpolation`,
`crop_pct`), and optionally `model_args` (what `timm.create_model` was given) and `label_names`.

    is_timm_config(config)        timm's config.json: `architecture` and no `model_type`
    as_jaxtune_config(config)     the HF-style dict jaxtune's families read: model_type `timm_resnet`
                                  or `timm_vgg`, the architecture's sizes, labels; the file's own dict
                                  travels along under `timm_config`, so that an export can write it back
    image_processor(config)       `pretrained_cfg`'s evaluation preprocessing as an HF image processor dict
    checkpoint_config(cfg, ...)   the config.json an export writes, in timm's format

The weights need no translation: the `timm_resnet` family (jaxtune's ResNet, which is transformers'
layout and timm's math: `jaxtune.models.resnet.timm`) and `timm_vgg` (`jaxtune.models.vgg`) name
their parameters with timm's keys. Nothing here imports timm or torch.

Architectures: timm's standard ResNets (7x7 stem, max pool, basic or bottleneck blocks striding in
their 3x3 convolution, 1x1 projection shortcuts) and the VGGs with and without BatchNorm. A variant
whose network differs (deep stem, average-pool shortcuts, grouped convolutions, attention, ...)
or a `model_args` value jaxtune would not build as given is one ModelLoadError line naming the
architecture and what is not supported, never a model that computes something else.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from jaxtune.errors import ModelLoadError

TIMM_CONFIG = "timm_config"  # where the timm file's own dict travels inside the jaxtune config

# architecture -> (block, blocks per stage), as timm's resnet.py registers them
RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet26": ("bottleneck", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
    "resnet200": ("bottleneck", (3, 24, 36, 3)),
}
RESNET_CHANNELS = (64, 128, 256, 512)  # timm's `channels` default: each stage's base width
EXPANSION = {"basic": 1, "bottleneck": 4}
BLOCK_NAMES = {"basicblock": "basic", "basic": "basic", "bottleneck": "bottleneck"}
VGG_NAME = re.compile(r"^vgg(11|13|16|19)(_bn)?$")
VGG_FEATURES = 512  # timm's VGG `num_features`: the last convolution's width

# What a timm architecture outside the supported ones has that jaxtune's networks lack (first match).
UNSUPPORTED = (
    (r"^resnet\d+[cs]$", "a deep stem of three 3x3 convolutions (stem_type 'deep')"),
    (r"^resnet\d+d$", "a deep stem and average-pool shortcuts (stem_type 'deep', avg_down)"),
    (r"^resnet\d+t$", "a tiered deep stem and average-pool shortcuts (stem_type 'deep_tiered', avg_down)"),
    (r"^resnetrs", "ResNet-RS blocks (deep stem, squeeze-excitation)"),
    (r"^(se|eca|gc|ge|sk|cbam)", "attention or selective-kernel blocks"),
    (r"resnext", "grouped convolutions (cardinality > 1)"),
    (r"^wide_resnet", "wide bottlenecks (base_width 128)"),
    (r"^resnet(blur|aa)", "anti-aliased downsampling (aa_layer)"),
    (r"_gn$", "GroupNorm instead of BatchNorm"),
    (r"resne", "a ResNet variant other than the standard ones"),
    (r"^vgg", "a VGG other than vgg11/13/16/19 and their _bn twins"),
)
SUPPORTED = ", ".join([*RESNETS, "vgg11/13/16/19 (+ _bn)"])

# model_args jaxtune builds in one way only: the value it implies (None: absent or empty).
# (drop_path_rate / drop_block_rate: stochastic depth and DropBlock, which jaxtune does not train with.)
RESNET_FIXED = {"cardinality": 1, "base_width": 64, "stem_type": "", "replace_stem_pool": False,
                "block_reduce_first": 1, "down_kernel_size": 1, "avg_down": False, "output_stride": 32,
                "act_layer": "relu", "norm_layer": "batchnorm2d", "aa_layer": None, "drop_rate": 0.0,
                "drop_path_rate": 0.0, "drop_block_rate": 0.0, "block_args": None, "global_pool": "avg"}
# model_args that are free: read into the config, or without effect on the network built
# (stem_width sizes only deep stems; zero_init_last only initialisation)
RESNET_FREE = ("num_classes", "in_chans", "layers", "channels", "block", "stem_width", "zero_init_last")
VGG_FIXED = {"output_stride": 32, "act_layer": "relu", "conv_layer": "conv2d", "global_pool": "avg"}
VGG_FREE = ("num_classes", "in_chans", "mlp_ratio", "drop_rate", "norm_layer")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}  # PIL filters


def is_timm_config(config: dict) -> bool:
    """Whether a config.json dict is timm's (HF's always has `model_type`, timm's never)."""
    return "model_type" not in config and isinstance(config.get("architecture"), str)


def pretrained_cfg(timm: dict) -> dict:
    """The file's `pretrained_cfg`; older timm files are that dict alone, `architecture` included."""
    cfg = timm.get("pretrained_cfg", timm)
    return cfg if isinstance(cfg, dict) else {}


def _matches(value: Any, expected: Any) -> bool:
    if expected is None:
        return value in (None, "", {}, [])
    if isinstance(expected, bool):
        return value is expected
    if isinstance(expected, str):  # layer names: 'ReLU' / 'relu', 'BatchNorm2d' / 'batchnorm'
        return isinstance(value, str) and value.lower().removesuffix("2d") == expected.removesuffix("2d")
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) == float(expected)


def _check_args(where, arch: str, model_args: dict, fixed: dict, free: tuple, network: str) -> None:
    for key, value in model_args.items():
        if key in free:
            continue
        if key not in fixed:
            raise ModelLoadError(f"{where}: timm {arch} with model_args {key}={value!r}: not an argument "
                                 f"jaxtune's {network} knows how to build")
        if not _matches(value, fixed[key]):
            raise ModelLoadError(f"{where}: timm {arch} with model_args {key}={value!r} is not supported "
                                 f"(jaxtune's {network} builds {key}={fixed[key]!r})")


def _ints(where, arch: str, key: str, value: Any) -> tuple:
    if not (isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and v > 0 for v in value)):
        raise ModelLoadError(f"{where}: timm {arch} with model_args {key}={value!r}: expected a list of "
                             "positive integers")
    return tuple(value)


def _resnet_fields(where, arch: str, model_args: dict) -> dict:
    _check_args(where, arch, model_args, RESNET_FIXED, RESNET_FREE, "ResNet")
    block, depths = RESNETS[arch]
    if "block" in model_args:
        block = BLOCK_NAMES.get(str(model_args["block"]).lower())
        if block is None:
            raise ModelLoadError(f"{where}: timm {arch} with model_args block={model_args['block']!r} is not "
                                 "supported (jaxtune's ResNet builds BasicBlock or Bottleneck)")
    depths = _ints(where, arch, "layers", model_args["layers"]) if "layers" in model_args else depths
    channels = _ints(where, arch, "channels", model_args["channels"]) if "channels" in model_args \
        else RESNET_CHANNELS
    if len(channels) != len(depths):
        raise ModelLoadError(f"{where}: timm {arch} with model_args layers {list(depths)} and channels "
                             f"{list(channels)}: one width per stage needed")
    return {"layer_type": block, "depths": list(depths), "embedding_size": 64,
            "hidden_sizes": [c * EXPANSION[block] for c in channels]}


def _vgg_fields(where, arch: str, model_args: dict) -> dict:
    depth, bn = VGG_NAME.match(arch).groups()
    _check_args(where, arch, model_args, VGG_FIXED, VGG_FREE, "VGG")
    norm = model_args.get("norm_layer")
    if norm is not None and not _matches(norm, "batchnorm2d" if bn else None):
        raise ModelLoadError(f"{where}: timm {arch} with model_args norm_layer={norm!r} is not supported "
                             f"(jaxtune's VGG builds {'BatchNorm2d' if bn else 'no normalization'} for {arch})")
    return {"depth": int(depth), "batch_norm": bool(bn), "mlp_ratio": float(model_args.get("mlp_ratio", 1.0)),
            "dropout": float(model_args.get("drop_rate", 0.0))}


def unsupported(where, arch: str) -> ModelLoadError:
    what = next((why for pattern, why in UNSUPPORTED if re.search(pattern, arch)), None)
    head = f"{where}: timm architecture '{arch}' is not supported"
    return ModelLoadError(f"{head}: {what}; jaxtune loads timm's {SUPPORTED}" if what
                          else f"{head}; jaxtune loads timm's {SUPPORTED}")


def label_names(timm: dict, num_classes: int) -> Optional[list[str]]:
    """The class names, in id order: `label_names` (a list, or a dict id -> name with gaps)."""
    names = timm.get("label_names") or pretrained_cfg(timm).get("label_names") or pretrained_cfg(timm).get("labels")
    if isinstance(names, dict):
        names = [str(names.get(str(i), names.get(i, f"LABEL_{i}"))) for i in range(num_classes)]
    return [str(n) for n in names] if isinstance(names, (list, tuple)) and len(names) == num_classes else None


def as_jaxtune_config(timm: dict, where) -> dict:
    """The HF-style config dict of a timm config.json (`where`: its path, for the errors)."""
    arch = timm["architecture"]
    model_args = timm.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise ModelLoadError(f"{where}: model_args must be a JSON object, got {type(model_args).__name__}")
    pre = pretrained_cfg(timm)
    pool = timm.get("global_pool", "avg")
    if pool not in ("avg", ""):  # '' (no pooling) only comes with num_classes 0: a new head pools by average
        raise ModelLoadError(f"{where}: timm {arch} with global_pool '{pool}' is not supported (jaxtune pools "
                             "by average, global_pool 'avg')")
    num_classes = int(model_args.get("num_classes", timm.get("num_classes", pre.get("num_classes", 1000))))
    in_chans = int(model_args.get("in_chans", (pre.get("input_size") or (3,))[0]))
    if arch in RESNETS:
        model_type, prefix, fields = "timm_resnet", "ResNet", _resnet_fields(where, arch, model_args)
    elif VGG_NAME.match(arch):
        model_type, prefix, fields = "timm_vgg", "VGG", _vgg_fields(where, arch, model_args)
    else:
        raise unsupported(where, arch)
    config = {"model_type": model_type, "architectures": [f"{prefix}ForImageClassification" if num_classes
                                                          else f"{prefix}Model"],
              "num_channels": in_chans, **fields, TIMM_CONFIG: timm}
    if num_classes:
        names = label_names(timm, num_classes)
        config["num_labels"] = num_classes
        if names:
            config["id2label"] = {str(i): n for i, n in enumerate(names)}
    return config


def per_channel(values, channels: int) -> list[float]:
    """A mean or std for each input channel: one value repeated (as timm does), or for a model whose
    input channels differ from the statistics' (an RGB mean, a grayscale model) their average."""
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    return values * channels if len(values) == 1 else [sum(values) / len(values)] * channels


def image_processor(config: dict) -> Optional[dict]:
    """`pretrained_cfg`'s evaluation preprocessing (timm's: short side to size / crop_pct, centre
    crop, `interpolation`, mean / std) as an HF image processor dict; None unless `config` (what
    `hf.read_config` returns) came from a timm folder. `crop_mode` 'squash' resizes without crop.
    (At 384 pixels and up jaxtune's ImageSettings resize without the crop, transformers' rule for
    a `shortest_edge` size; timm's standard ResNets and VGGs evaluate at 224.)"""
    timm = config.get(TIMM_CONFIG)
    if timm is None:
        return None
    pre = pretrained_cfg(timm)
    channels, h, w = pre.get("input_size") or (3, 224, 224)
    channels = config.get("num_channels", channels)
    mean = per_channel(pre.get("mean") or IMAGENET_MEAN, channels)
    std = per_channel(pre.get("std") or IMAGENET_STD, channels)
    crop_pct = pre.get("crop_pct")
    crop = bool(crop_pct) and h == w and pre.get("crop_mode", "center") != "squash"
    out = {"size": {"shortest_edge": h} if crop else {"height": h, "width": w}, "image_mean": mean,
           "image_std": std, "resample": RESAMPLE.get(pre.get("interpolation", "bilinear"), 2)}
    if crop:
        out["crop_pct"] = crop_pct
    return out


def source_config(cfg) -> dict:
    """The timm config.json a jaxtune config was read from ({} for one built from model.config)."""
    return next((json.loads(v) for k, v in cfg.extra if k == TIMM_CONFIG), None) or {}


def _resnet_export(cfg, source: dict) -> tuple[str, dict, int]:
    """(architecture, model_args it needs, num_features) of a `timm_resnet` config."""
    depths = tuple(cfg.depths)
    arch = source.get("architecture")
    if RESNETS.get(arch, (None,))[0] != cfg.layer_type:  # the closest registered name builds the same blocks
        arch = next((a for a, spec in RESNETS.items() if spec == (cfg.layer_type, depths)),
                    "resnet18" if cfg.layer_type == "basic" else "resnet50")
    args = {}
    if depths != RESNETS[arch][1]:
        args["layers"] = list(depths)
    channels = tuple(h // EXPANSION[cfg.layer_type] for h in cfg.hidden_sizes)
    if channels != RESNET_CHANNELS:
        args["channels"] = list(channels)
    return arch, args, cfg.hidden_sizes[-1]


def _vgg_export(cfg) -> tuple[str, dict, int]:
    arch = f"vgg{cfg.depth}" + ("_bn" if cfg.batch_norm else "")
    return arch, ({"mlp_ratio": cfg.mlp_ratio} if cfg.mlp_ratio != 1.0 else {}), VGG_FEATURES


# what an export rewrites in model_args (drop rates: timm's own export leaves them out too)
_REWRITTEN_ARGS = ("num_classes", "in_chans", "global_pool", "layers", "channels", "block", "mlp_ratio",
                   "drop_rate", "drop_path_rate", "drop_block_rate")


def checkpoint_config(cfg, *, classifier: bool) -> dict:
    """The config.json of an export in timm's format (what `timm.create_model('local-dir:...')`
    reads): the source file's fields, with num_classes, labels, input channels and the
    architecture's arguments as the jaxtune config now has them. `classifier`: whether the model
    has a classification head (the base network exports with num_classes 0)."""
    source = source_config(cfg)
    if cfg.model_type == "timm_resnet":
        arch, arch_args, num_features = _resnet_export(cfg, source)
        first_conv, head = "conv1", "fc"
    else:
        arch, arch_args, num_features = _vgg_export(cfg)
        first_conv, head = "features.0", "head.fc"
    num_classes = cfg.num_labels if classifier else 0
    names = list(cfg.id2label) if classifier and cfg.id2label else None
    same_labels = names is not None and names == label_names(source, num_classes)
    pre = {k: v for k, v in pretrained_cfg(source).items() if k != "architecture"}
    if not pre:  # a model built from model.config: timm's defaults for these families
        pre = {"input_size": [cfg.num_channels, 224, 224], "interpolation": "bilinear", "crop_pct": 0.875,
               "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "pool_size": [7, 7]}
    if not same_labels:
        for key in ("label_names", "label_descriptions", "labels", "label_offset"):
            pre.pop(key, None)
    pre.update(num_classes=num_classes, first_conv=first_conv, classifier=head,
               input_size=[cfg.num_channels, *(pre.get("input_size") or (3, 224, 224))[1:]])
    model_args = {k: v for k, v in (source.get("model_args") or {}).items() if k not in _REWRITTEN_ARGS}
    model_args.update(arch_args, num_classes=num_classes, in_chans=cfg.num_channels, global_pool="avg")
    # other top-level fields of the source file stay (an older single-dict file's are pre's)
    out = {k: v for k, v in source.items() if k not in ("label_names", "label_descriptions", "pretrained_cfg")} \
        if "pretrained_cfg" in source else {}
    out.update(architecture=arch, num_classes=num_classes, num_features=num_features, global_pool="avg",
               model_args=model_args)
    if names and not all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        out["label_names"] = names
        if same_labels and source.get("label_descriptions"):
            out["label_descriptions"] = source["label_descriptions"]
    out["pretrained_cfg"] = pre
    return out


__all__ = ["RESNETS", "TIMM_CONFIG", "as_jaxtune_config", "checkpoint_config", "image_processor", "is_timm_config",
           "label_names", "pretrained_cfg", "source_config"]
