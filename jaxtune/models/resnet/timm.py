"""timm's ResNet (`model_type` timm_resnet): jaxtune's ResNet modules under timm's key names.

timm's standard ResNets (`resnet18` ... `resnet200`) compute what transformers' ResNet computes:
a 7x7 stride-2 stem, BatchNorm, ReLU, a 3x3 stride-2 max pool; basic blocks (two 3x3 convolutions,
the first striding) or bottlenecks (1x1 reduce by 4, 3x3 striding, 1x1 expand); a 1x1 projection
shortcut (convolution + BatchNorm) where a block changes width or stride; ReLU after the sum;
global average pool; a linear classifier. Only the names differ, so the model classes are the
ResNet family's and this module holds the config that checks a ResNet stays expressible in timm's
terms, and the key table:

    jaxtune (resnet/...)                                    timm
    embedder/embedder/{convolution,normalization}           conv1, bn1
    encoder/stages/i/layers/j/layer/k/{convolution,...}     layer{i+1}.{j}.conv{k+1}, .bn{k+1}
    encoder/stages/i/layers/j/shortcut/{convolution,...}    layer{i+1}.{j}.downsample.0, .1
    classifier                                              fc

timm checkpoints have no base-model prefix, with a head or without (num_classes 0), so the table
drops the head's `resnet/` itself. Reading and writing the folder format: `jaxtune.models.timm_folder`.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtune.errors import ModelLoadError
from jaxtune.models import timm_folder
from jaxtune.models.family import DEFAULT_RULES, KeyRule
from jaxtune.models.resnet.conv import conv_weight_from_torch, conv_weight_to_torch
from jaxtune.models.resnet.modeling import ResNetConfig


@dataclass(frozen=True)
class TimmResNetConfig(ResNetConfig):
    """A ResNet that timm builds: its stem is 64 wide, every activation ReLU, every block strides
    in its first 3x3 convolution, BatchNorm's eps PyTorch's (momentum only trains: any)."""

    model_type = "timm_resnet"

    def __post_init__(self):
        super().__post_init__()
        fixed = {"embedding_size": 64, "hidden_act": "relu", "downsample_in_first_stage": False,
                 "downsample_in_bottleneck": False, "batch_norm_eps": 1e-5}
        for field, value in fixed.items():
            if getattr(self, field) != value:
                raise ModelLoadError(f"timm_resnet: {field} {getattr(self, field)!r} is not something timm's "
                                     f"ResNet builds (it has {value!r})")
        if self.layer_type == "bottleneck" and any(h % 4 for h in self.hidden_sizes):
            raise ModelLoadError(f"timm_resnet: bottleneck hidden_sizes {list(self.hidden_sizes)} must be "
                                 "multiples of 4 (timm's channels x 4)")

    def to_checkpoint_config(self, head_cls) -> dict:
        """timm's config.json for an export (`jaxtune.models.pretrained.save_pretrained`)."""
        return timm_folder.checkpoint_config(self, classifier=head_cls.hf_architecture != "ResNetModel")


_BASE = r"^(?:resnet/)?"  # the head's base-model attribute; timm has none
_STAGE = _BASE + r"encoder/stages/(\d+)/layers/(\d+)/"
_BN = {"scale": "weight"}  # BatchNorm2d: our scale is PyTorch's weight; the rest keep their names


def _bn(name: str) -> str:
    return _BN.get(name, name)


def _block_conv(m) -> str:
    return f"layer{int(m[1]) + 1}/{m[2]}/conv{int(m[3]) + 1}/weight"


def _block_bn(m) -> str:
    return f"layer{int(m[1]) + 1}/{m[2]}/bn{int(m[3]) + 1}/{_bn(m[4])}"


def _shortcut_conv(m) -> str:
    return f"layer{int(m[1]) + 1}/{m[2]}/downsample/0/weight"


def _shortcut_bn(m) -> str:
    return f"layer{int(m[1]) + 1}/{m[2]}/downsample/1/{_bn(m[3])}"


# `hf` may be a function of the match (re.sub takes either): timm counts stages and convolutions from 1.
KEY_RULES = (
    KeyRule(_BASE + r"embedder/embedder/convolution/kernel$", "conv1/weight", conv_weight_to_torch,
            conv_weight_from_torch),
    KeyRule(_BASE + r"embedder/embedder/normalization/(\w+)$", lambda m: f"bn1/{_bn(m[1])}"),
    KeyRule(_STAGE + r"layer/(\d+)/convolution/kernel$", _block_conv, conv_weight_to_torch, conv_weight_from_torch),
    KeyRule(_STAGE + r"layer/(\d+)/normalization/(\w+)$", _block_bn),
    KeyRule(_STAGE + r"shortcut/convolution/kernel$", _shortcut_conv, conv_weight_to_torch, conv_weight_from_torch),
    KeyRule(_STAGE + r"shortcut/normalization/(\w+)$", _shortcut_bn),
    KeyRule(r"^classifier/kernel$", "fc/weight", DEFAULT_RULES[0].to_hf, DEFAULT_RULES[0].from_hf),
    KeyRule(r"^classifier/bias$", "fc/bias"),
)

IGNORE_KEYS = ()

# A checkpoint without a classifier (num_classes 0) gets a new one (initialised, with a warning).
NEW_OK = (r"^classifier/",)
