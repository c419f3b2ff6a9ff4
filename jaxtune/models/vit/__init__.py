"""ViT family (`model_type` vit): base encoder and image classification."""

from jaxtune.models.core import Family, layered_depth
from jaxtune.models.vit.modeling import ViTConfig, ViTForImageClassification, ViTModel
from jaxtune.models.vit.params import IGNORE_KEYS, KEY_RULES, NEW_OK


def num_layers(config: ViTConfig) -> int:
    return config.num_hidden_layers


FAMILY = Family(
    model_type="vit",
    config_cls=ViTConfig,
    heads={"base": ViTModel, "image-classification": ViTForImageClassification},
    base_prefix="vit",
    # embeddings (patches, CLS, positions) -> 0, encoder.layer.i -> i + 1, layernorm/pooler/head -> L + 1
    depth_of=layered_depth("embeddings", "layer", num_layers),
    num_layers=num_layers,
    key_rules=KEY_RULES,
    ignore_keys=IGNORE_KEYS,
    new_ok=NEW_OK,
)

__all__ = ["FAMILY", "ViTConfig", "ViTForImageClassification", "ViTModel"]
