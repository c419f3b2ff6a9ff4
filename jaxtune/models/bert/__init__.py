"""BERT family (also MiniLM and most BERT-architecture checkpoints)."""

from jaxtune.models.bert.modeling import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from jaxtune.models.bert.params import IGNORE_KEYS, KEY_RULES, NEW_OK
from jaxtune.models.core import Family, layered_depth


def num_layers(config: BertConfig) -> int:
    return config.num_hidden_layers


FAMILY = Family(
    model_type="bert",
    config_cls=BertConfig,
    heads={
        "base": BertModel,
        "sequence-classification": BertForSequenceClassification,
        "token-classification": BertForTokenClassification,
        "masked-lm": BertForMaskedLM,
    },
    base_prefix="bert",
    depth_of=layered_depth("embeddings", "layer", num_layers),
    num_layers=num_layers,
    key_rules=KEY_RULES,
    ignore_keys=IGNORE_KEYS,
    new_ok=NEW_OK,
)

__all__ = [
    "FAMILY",
    "BertConfig",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
]
