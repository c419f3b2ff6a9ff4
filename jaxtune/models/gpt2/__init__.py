"""GPT-2 family (`model_type` gpt2): base decoder, causal-LM head (tied), sequence classification."""

from jaxtune.models.family import define
from jaxtune.models.gpt2 import modeling, params

# wte / wpe -> depth 0, block h.i -> i + 1, ln_f and the heads -> L + 1
FAMILY = define(config_cls=modeling.GPT2Config, heads=modeling.HEADS, base_prefix="transformer", params=params,
                layers=(("wte", "wpe"), "h"), num_layers_field="n_layer")

__all__ = ["FAMILY"]
