"""RoBERTa family: `roberta` and `xlm-roberta` checkpoints (same layout, two model_types)."""

from jaxtune.models.family import define
from jaxtune.models.roberta import modeling, params

FAMILY = define(config_cls=modeling.RobertaConfig, heads=modeling.HEADS, base_prefix="roberta", params=params)
XLM_ROBERTA_FAMILY = define(config_cls=modeling.XLMRobertaConfig, heads=modeling.XLM_HEADS, base_prefix="roberta",
                            params=params)
# model_type -> Family, for the registry (one module serves both model_types).
FAMILIES = {"roberta": FAMILY, "xlm-roberta": XLM_ROBERTA_FAMILY}

__all__ = ["FAMILIES", "FAMILY", "XLM_ROBERTA_FAMILY"]
