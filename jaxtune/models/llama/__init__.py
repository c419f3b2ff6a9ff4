"""Llama-architecture family (`model_type`s llama, mistral, qwen2, qwen3): base decoder, causal-LM
head (tied or untied), sequence classification. One implementation (modeling.py) and one key table
(params.py); each model type has its own config and head classes."""

from jaxtune.models.family import define
from jaxtune.models.llama import modeling, params

# embed_tokens -> depth 0, layers.i -> i + 1, the final norm and the heads -> L + 1
FAMILIES = {
    model_type: define(config_cls=modeling.CONFIGS[model_type], heads=modeling.HEADS[model_type],
                       base_prefix="model", params=params, layers=("embed_tokens", "layers"))
    for model_type in ("llama", "mistral", "qwen2", "qwen3")
}
FAMILY = FAMILIES["llama"]

__all__ = ["FAMILIES", "FAMILY"]
