"""ResNet family (`model_type` resnet): base network and image classification (transformers'
layout; BatchNorm running statistics are `nnx.BatchStat`s, loaded and exported with the weights).
The same modules under timm's key names are `timm_resnet` (`jaxtune.models.resnet.timm`)."""

from jaxtune.models.family import define
from jaxtune.models.resnet import modeling, params, timm

# the stem (embedder) -> depth 0, encoder.stages.i -> i + 1, the classifier -> num_stages + 1
FAMILY = define(config_cls=modeling.ResNetConfig, heads=modeling.HEADS, base_prefix="resnet", params=params,
                layers=("embedder", "stages"), num_layers_field="num_stages")
TIMM_FAMILY = define(config_cls=timm.TimmResNetConfig, heads=modeling.HEADS, base_prefix="resnet", params=timm,
                     layers=("embedder", "stages"), num_layers_field="num_stages")
FAMILIES = {"resnet": FAMILY, "timm_resnet": TIMM_FAMILY}

__all__ = ["FAMILIES", "FAMILY", "TIMM_FAMILY"]
