"""RoBERTa family: `roberta` and `xlm-roberta` checkpoints (same layout, two model_types)."""

from jaxtune.models.core import Family, layered_depth
from jaxtune.models.roberta.modeling import (
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
    XLMRobertaForSequenceClassification,
    XLMRobertaForTokenClassification,
    XLMRobertaModel,
)
from jaxtune.models.roberta.params import IGNORE_KEYS, KEY_RULES, NEW_OK


def num_layers(config: RobertaConfig) -> int:
    return config.num_hidden_layers


def _family(config_cls, base, seq, tok, mlm) -> Family:
    return Family(
        model_type=config_cls.model_type,
        config_cls=config_cls,
        heads={
            "base": base,
            "sequence-classification": seq,
            "token-classification": tok,
            "masked-lm": mlm,
        },
        base_prefix="roberta",
        depth_of=layered_depth("embeddings", "layer", num_layers),
        num_layers=num_layers,
        key_rules=KEY_RULES,
        ignore_keys=IGNORE_KEYS,
        new_ok=NEW_OK,
    )


FAMILY = _family(RobertaConfig, RobertaModel, RobertaForSequenceClassification,
                 RobertaForTokenClassification, RobertaForMaskedLM)
XLM_ROBERTA_FAMILY = _family(XLMRobertaConfig, XLMRobertaModel, XLMRobertaForSequenceClassification,
                             XLMRobertaForTokenClassification, XLMRobertaForMaskedLM)
# model_type -> Family, for the registry (one module serves both model_types).
FAMILIES = {"roberta": FAMILY, "xlm-roberta": XLM_ROBERTA_FAMILY}

__all__ = [
    "FAMILIES",
    "FAMILY",
    "XLM_ROBERTA_FAMILY",
    "RobertaConfig",
    "RobertaForMaskedLM",
    "RobertaForSequenceClassification",
    "RobertaForTokenClassification",
    "RobertaModel",
    "XLMRobertaConfig",
    "XLMRobertaForMaskedLM",
    "XLMRobertaForSequenceClassification",
    "XLMRobertaForTokenClassification",
    "XLMRobertaModel",
]
