"""Tiny random Llama-family checkpoints (llama, mistral, qwen2, qwen3) for tests/models/test_llama*.py,
built like `_tiny_gpt2_vit`: a transformers (PyTorch) model with seeded random weights, every
parameter perturbed away from its init, saved with `save_pretrained`.

Odd sizes on purpose, one feature set per model type (`CONFIGS`):

- llama: 4 heads / 2 kv heads, head_dim 12 != 40 / 4, llama3 rope scaling, q/k/v/o and MLP biases,
  tied embeddings;
- mistral: 4 heads / 1 kv head, head_dim 6, sliding window 4 (shorter than the sequences), untied;
- qwen2: hidden 36, 6 heads / 2 kv heads, q/k/v biases, linear rope scaling, use_sliding_window
  with max_window_layers 1 (layers 1 and 2 slide, layer 0 does not), untied;
- qwen3: hidden 30 with 4 heads of head_dim 10 (30 is not a multiple of 4), 2 kv heads, per-head
  q/k RMSNorm, attention biases, tied embeddings.
"""

from __future__ import annotations

from typing import NamedTuple, Any
from pathlib import Path

COMMON = dict(vocab_size=97, intermediate_size=37, num_hidden_layers=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "llama": dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8},
                  attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral": dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=1, head_dim=6, sliding_window=4,
                    tie_word_embeddings=False),
    "qwen2": dict(hidden_size=36, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                  rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0},
                  use_sliding_window=True, sliding_window=3, max_window_layers=1, tie_word_embeddings=False),
    "qwen3": dict(hidden_size=30, num_attention_heads=4, num_key_value_heads=2, head_dim=10, attention_bias=True,
                  tie_word_embeddings=True),
}
MODEL_TYPES = tuple(CONFIGS)
PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
SUFFIX = {"base": "Model", "causal-lm": "ForCausalLM", "sequence-classification": "ForSequenceClassification"}


class Tiny(NamedTuple):
    path: Path
    model: Any  # the transformers model, eval mode


def hf_config(model_type: str, **overrides):
    import transformers

    return getattr(transformers, PREFIX[model_type] + "Config")(**{**COMMON, **CONFIGS[model_type], **overrides})


def build_hf_model(model_type: str, task: str = "causal-lm", seed: int = 0, scale: float = 0.1, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, PREFIX[model_type] + SUFFIX[task])
    model = cls(hf_config(model_type, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # a tied embedding is one Parameter: perturbed once
            p.add_(scale * torch.randn_like(p))
    return model


class Factory:
    """`make(model_type, task, **overrides) -> Tiny`, each checkpoint built once per factory."""

    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.cache: dict = {}

    def __call__(self, model_type: str, task: str = "causal-lm", **overrides) -> Tiny:
        key = (model_type, task, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in self.cache:
            model = build_hf_model(model_type, task, **overrides)
            path = self.tmp.mktemp(f"{model_type}-{task}")
            model.save_pretrained(path)
            self.cache[key] = Tiny(path, model)
        return self.cache[key]


# Sharded training (test_llama_parallel.py): dims the default rules split, kv heads dividing the
# tensor axis (2 kv heads of 8 over tensor=2) or not (1 kv head of 6 over tensor=4).
SHARDED = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
               attention_bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
SHARDED_KV_REPLICATED = dict(SHARDED, model_type="qwen3", num_key_value_heads=1, head_dim=6,
                             tie_word_embeddings=True)
