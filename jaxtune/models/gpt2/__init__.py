"""GPT-2 family (`model_type` gpt2): base decoder, causal-LM head (tied), sequence classification."""

from jaxtune.models.core import Family
from jaxtune.models.gpt2.modeling import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    KVCache,
)
from jaxtune.models.gpt2.params import IGNORE_KEYS, KEY_RULES, NEW_OK


def num_layers(config: GPT2Config) -> int:
    return config.n_layer


def depth_of(config: GPT2Config, path: tuple) -> int:
    """wte / wpe -> 0, block h.i -> i + 1, ln_f and the heads -> L + 1."""
    for i, part in enumerate(path):
        if part in ("wte", "wpe"):
            return 0
        if part == "h" and i + 1 < len(path) and isinstance(path[i + 1], int):
            return path[i + 1] + 1
    return config.n_layer + 1


FAMILY = Family(
    model_type="gpt2",
    config_cls=GPT2Config,
    heads={
        "base": GPT2Model,
        "causal-lm": GPT2LMHeadModel,
        "sequence-classification": GPT2ForSequenceClassification,
    },
    base_prefix="transformer",
    depth_of=depth_of,
    num_layers=num_layers,
    key_rules=KEY_RULES,
    ignore_keys=IGNORE_KEYS,
    new_ok=NEW_OK,
)

__all__ = [
    "FAMILY",
    "GPT2Config",
    "GPT2ForSequenceClassification",
    "GPT2LMHeadModel",
    "GPT2Model",
    "KVCache",
]
