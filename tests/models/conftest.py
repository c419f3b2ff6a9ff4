"""Tiny random transformers checkpoints, built once per session, and the PyTorch reference.

`tiny(arch, task, **config)` returns a `Tiny(path, model)`: a transformers (PyTorch) model with
seeded random weights, every parameter perturbed away from its init (so that LayerNorm scales,
biases and heads all matter), saved with `save_pretrained` into a session temp dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import _tiny_gpt2_vit
import _tiny_llama

# Each architecture's tiny config exercises something non-default: odd head counts
# (hidden 30 with 3 or 5 heads), activations, layer_norm_eps, token types.
ARCHS = {
    "bert": ("Bert", "BertConfig", dict(
        hidden_size=30, num_attention_heads=3, hidden_act="gelu_new", layer_norm_eps=1e-3,
        type_vocab_size=2)),
    "roberta": ("Roberta", "RobertaConfig", dict(
        hidden_size=30, num_attention_heads=5, hidden_act="relu", layer_norm_eps=1e-2,
        type_vocab_size=1, pad_token_id=1)),
    "xlm-roberta": ("XLMRoberta", "XLMRobertaConfig", dict(
        hidden_size=30, num_attention_heads=3, hidden_act="silu", layer_norm_eps=1e-6,
        type_vocab_size=2, pad_token_id=1)),
    "distilbert": ("DistilBert", "DistilBertConfig", dict(
        dim=30, n_heads=5, hidden_dim=37, n_layers=2, activation="relu")),
}
COMMON = dict(vocab_size=97, max_position_embeddings=40, num_hidden_layers=2, intermediate_size=37)
HEADS = {
    "base": "Model",
    "sequence-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "masked-lm": "ForMaskedLM",
}
TASKS = tuple(HEADS)


class Tiny(NamedTuple):
    path: Path
    model: Any  # the transformers model, eval mode


def hf_config(arch: str, **overrides):
    import transformers

    _, config_cls, kw = ARCHS[arch]
    base = dict(COMMON) if arch != "distilbert" else dict(vocab_size=97, max_position_embeddings=40)
    return getattr(transformers, config_cls)(**{**base, **kw, **overrides})


def build_hf_model(arch: str, task: str = "base", seed: int = 0, **overrides):
    import torch
    import transformers

    prefix = ARCHS[arch][0]
    torch.manual_seed(seed)
    model = getattr(transformers, prefix + HEADS[task])(hf_config(arch, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one Parameter: perturbed once
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    cache: dict = {}

    def make(arch: str, task: str = "base", **overrides) -> Tiny:
        key = (arch, task, tuple(sorted(overrides.items())))
        if key not in cache:
            model = build_hf_model(arch, task, **overrides)
            path = tmp_path_factory.mktemp(f"{arch}-{task}")
            model.save_pretrained(path)
            cache[key] = Tiny(path, model)
        return cache[key]

    return make


def make_batch(config, batch: int = 3, seq: int = 9, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded random ids (pad id where masked); token types where the model has them."""
    rng = np.random.default_rng(seed)
    pad = config.pad_token_id
    ids = rng.integers(0, config.vocab_size, (batch, seq))
    ids = np.where(ids == pad, pad + 1, ids)
    lengths = np.array([seq, seq - 3, 2][:batch])
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    out = {"input_ids": np.where(mask == 1, ids, pad), "attention_mask": mask}
    if getattr(config, "type_vocab_size", 1) > 1:
        out["token_type_ids"] = rng.integers(0, 2, (batch, seq)) * mask
    return out


def torch_forward(model, batch: dict):
    import torch

    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()},
                     output_hidden_states=True)


@pytest.fixture(scope="session")
def batch_for():
    return make_batch


@pytest.fixture(scope="session")
def reference():
    return torch_forward


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    """Tiny GPT-2 / ViT checkpoints (`_tiny_gpt2_vit.Factory`), for tests that span families."""
    return _tiny_gpt2_vit.Factory(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """Tiny Llama-family checkpoints (`_tiny_llama.Factory`), for tests that span families."""
    return _tiny_llama.Factory(tmp_path_factory)
