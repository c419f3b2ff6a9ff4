"""DistilBERT family (`model_type` distilbert)."""

from jaxtune.models.distilbert import modeling, params
from jaxtune.models.family import define

FAMILY = define(config_cls=modeling.DistilBertConfig, heads=modeling.HEADS, base_prefix="distilbert", params=params,
                num_layers_field="n_layers")

__all__ = ["FAMILY"]
