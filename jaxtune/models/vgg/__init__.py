"""timm's VGG family (`model_type` timm_vgg): base network and image classification, under
timm's key names (`jaxtune.models.timm_folder` reads and writes timm's folders)."""

import operator

from jaxtune.models.family import Family
from jaxtune.models.vgg import modeling, params


def feature_depths(config: modeling.VGGConfig) -> list[int]:
    """Per entry of `features`: the ordinal (from 1) of the convolution it belongs to."""
    depths, ordinal = [], 0
    for v in config.layout:
        if v == "M":
            depths.append(ordinal)  # a pool holds no parameters
        else:
            ordinal += 1
            depths += [ordinal] * (3 if config.batch_norm else 2)  # conv, (BatchNorm,) ReLU
    return depths


def depth_of(config: modeling.VGGConfig, path: tuple) -> int:
    """Layer-wise depth: a convolution of `features` (with its BatchNorm) -> its ordinal (from 1),
    the head (pre_logits, classifier) -> the number of convolutions + 1. Nothing is at depth 0."""
    if "features" in path:
        return feature_depths(config)[path[path.index("features") + 1]]
    return config.num_conv_layers + 1


FAMILY = Family(model_type=modeling.VGGConfig.model_type, config_cls=modeling.VGGConfig, heads=modeling.HEADS,
                base_prefix="vgg", depth_of=depth_of, num_layers=operator.attrgetter("num_conv_layers"),
                key_rules=params.KEY_RULES, ignore_keys=params.IGNORE_KEYS, new_ok=params.NEW_OK)

__all__ = ["FAMILY"]
