"""ResNet family (`model_type` resnet): base network and image classification (transformers'
layout; BatchNorm running statistics are `nnx.BatchStat`s, loaded and exported with the weights)."""

from jaxtune.models.family import define
from jaxtune.models.resnet import modeling, params

# the stem (embedder) -> depth 0, encoder.stages.i -> i + 1, the classifier -> num_stages + 1
FAMILY = define(config_cls=modeling.ResNetConfig, heads=modeling.HEADS, base_prefix="resnet", params=params,
                layers=("embedder", "stages"), num_layers_field="num_stages")

__all__ = ["FAMILY"]
