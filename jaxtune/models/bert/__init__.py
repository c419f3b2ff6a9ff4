"""BERT family (also MiniLM and most BERT-architecture checkpoints)."""

from jaxtune.models.bert import modeling, params
from jaxtune.models.family import define

FAMILY = define(config_cls=modeling.BertConfig, heads=modeling.HEADS, base_prefix="bert", params=params)

__all__ = ["FAMILY"]
