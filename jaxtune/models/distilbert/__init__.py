"""DistilBERT family (`model_type` distilbert)."""

from jaxtune.models.core import Family, layered_depth
from jaxtune.models.distilbert.modeling import (
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertModel,
)
from jaxtune.models.distilbert.params import IGNORE_KEYS, KEY_RULES, NEW_OK


def num_layers(config: DistilBertConfig) -> int:
    return config.n_layers


FAMILY = Family(
    model_type="distilbert",
    config_cls=DistilBertConfig,
    heads={
        "base": DistilBertModel,
        "sequence-classification": DistilBertForSequenceClassification,
        "token-classification": DistilBertForTokenClassification,
        "masked-lm": DistilBertForMaskedLM,
    },
    base_prefix="distilbert",
    depth_of=layered_depth("embeddings", "layer", num_layers),
    num_layers=num_layers,
    key_rules=KEY_RULES,
    ignore_keys=IGNORE_KEYS,
    new_ok=NEW_OK,
)

__all__ = [
    "FAMILY",
    "DistilBertConfig",
    "DistilBertForMaskedLM",
    "DistilBertForSequenceClassification",
    "DistilBertForTokenClassification",
    "DistilBertModel",
]
