"""BART and Marian (`model_type`s bart, marian): encoder-decoder `base` and `seq2seq-lm` heads.
One implementation (modeling.py), one key table (params.py)."""

from jaxtune.models.bart import modeling, params
from jaxtune.models.family import Family, layered_depth


def _num_layers(config) -> int:
    return max(config.encoder_layers, config.decoder_layers)


def _define(model_type: str) -> Family:
    # shared and the learned positions -> depth 0, layers.i -> i + 1, lm_head and its bias -> L + 1
    return Family(model_type=model_type, config_cls=modeling.CONFIGS[model_type], heads=modeling.HEADS[model_type],
                  base_prefix="model", depth_of=layered_depth(("shared", "embed_positions", "layernorm_embedding"),
                                                              "layers", _num_layers),
                  num_layers=_num_layers, key_rules=params.KEY_RULES, ignore_keys=params.IGNORE_KEYS,
                  new_ok=params.NEW_OK)


FAMILIES = {model_type: _define(model_type) for model_type in ("bart", "marian")}
FAMILY = FAMILIES["bart"]

__all__ = ["FAMILIES", "FAMILY"]
