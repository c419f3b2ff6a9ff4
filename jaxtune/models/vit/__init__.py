"""ViT family (`model_type` vit): base encoder and image classification."""

from jaxtune.models.family import define
from jaxtune.models.vit import modeling, params

# embeddings (patches, CLS, positions) -> depth 0, encoder.layer.i -> i + 1, layernorm/pooler/head -> L + 1
FAMILY = define(config_cls=modeling.ViTConfig, heads=modeling.HEADS, base_prefix="vit", params=params)

__all__ = ["FAMILY"]
