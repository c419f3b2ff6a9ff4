"""T5 family (`model_type`s t5, mt5): the encoder alone (`base`) and the encoder-decoder LM
(`seq2seq-lm`). One implementation (modeling.py), one key table (params.py)."""

from jaxtune.models.family import Family, layered_depth
from jaxtune.models.t5 import modeling, params


def _num_layers(config) -> int:
    return max(config.num_layers, config.num_decoder_layers)


def _define(model_type: str) -> Family:
    # shared -> depth 0, encoder/decoder block i -> i + 1, final norms and lm_head -> L + 1
    return Family(model_type=model_type, config_cls=modeling.CONFIGS[model_type], heads=modeling.HEADS[model_type],
                  base_prefix="", depth_of=layered_depth("shared", "block", _num_layers), num_layers=_num_layers,
                  key_rules=params.KEY_RULES, ignore_keys=params.IGNORE_KEYS, new_ok=params.NEW_OK)


FAMILIES = {model_type: _define(model_type) for model_type in ("t5", "mt5")}
FAMILY = FAMILIES["t5"]

__all__ = ["FAMILIES", "FAMILY"]
