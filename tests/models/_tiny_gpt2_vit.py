"""Tiny random GPT-2 and ViT checkpoints for the tests of those families (tests/models/test_gpt2*.py,
test_vit*.py), built like conftest's `tiny`: a transformers (PyTorch) model with seeded random
weights, every parameter perturbed away from its init, saved with `save_pretrained`.

Test files load this module by path (pytest runs with --import-mode=importlib):

    tg = load_helper()   # see the top of each test file
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# Odd sizes on purpose: hidden 30 with 3 heads, inner 37, a non-square image with 2 channels.
GPT2 = dict(vocab_size=97, n_positions=48, n_embd=30, n_layer=2, n_head=3, n_inner=37,
            activation_function="gelu_new", layer_norm_epsilon=1e-3, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
VIT = dict(hidden_size=30, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
           image_size=[12, 8], patch_size=4, num_channels=2, layer_norm_eps=1e-6, hidden_act="gelu_new")

HF_CLASSES = {
    ("gpt2", "base"): "GPT2Model",
    ("gpt2", "causal-lm"): "GPT2LMHeadModel",
    ("gpt2", "sequence-classification"): "GPT2ForSequenceClassification",
    ("vit", "base"): "ViTModel",
    ("vit", "image-classification"): "ViTForImageClassification",
}


class Tiny(NamedTuple):
    path: Path
    model: Any  # the transformers model, eval mode


def hf_config(arch: str, **overrides):
    import transformers

    if arch == "gpt2":
        return transformers.GPT2Config(**{**GPT2, **overrides})
    return transformers.ViTConfig(**{**VIT, **overrides})


def build_hf_model(arch: str, task: str, seed: int = 0, scale: float = 0.1, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[arch, task])(hf_config(arch, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


class Factory:
    """`make(arch, task, **overrides) -> Tiny`, each checkpoint built once per factory."""

    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.cache: dict = {}

    def __call__(self, arch: str, task: str = "base", **overrides) -> Tiny:
        key = (arch, task, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in self.cache:
            model = build_hf_model(arch, task, **overrides)
            path = self.tmp.mktemp(f"{arch}-{task}")
            model.save_pretrained(path)
            self.cache[key] = Tiny(path, model)
        return self.cache[key]


def token_batch(batch: int = 3, seq: int = 9, seed: int = 0, pad: int = 0, vocab: int = 97, side: str = "right"):
    """Random ids (never pad, never 0-2 specials) with rows of length seq, seq - 3, 2."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, seq))
    lengths = np.array([seq, seq - 3, 2, seq - 1][:batch])
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    if side == "left":
        mask = mask[:, ::-1].copy()
    return {"input_ids": np.where(mask == 1, ids, pad).astype(np.int64), "attention_mask": mask}


def pixel_batch(batch: int = 3, channels: int = 2, hw=(12, 8), seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"pixel_values": rng.normal(size=(batch, channels, *hw)).astype(np.float32)}


def torch_forward(model, batch: dict, **kwargs):
    import torch

    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}, **kwargs)


def max_diff(a, b, keep=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if keep is not None:
        a, b = a[keep], b[keep]
    return float(np.abs(a - b).max())


# ---------------------------------------------------------------------------------------------
# Sharded training runs (test_gpt2_parallel.py, test_vit_parallel.py), as tests/_tiny_bert.py does
# for BERT: dims the default rules can split (embed over fsdp, heads / mlp / vocab over tensor).

GPT2_SHARDED = dict(model_type="gpt2", vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                    n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                    eos_token_id=2, pad_token_id=0)
VIT_SHARDED = dict(model_type="vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, image_size=[12, 8], patch_size=4, num_channels=2, num_labels=4)


def lm_batches(steps: int = 4, batch: int = 8, length: int = 12) -> list[dict]:
    """Right-padded LM batches; batch 2 is packed (segment_ids) and has two weight-0 filler rows."""
    rs = np.random.RandomState(0)
    out = []
    for i in range(steps):
        ids = rs.randint(3, 96, (batch, length)).astype(np.int32)
        lengths = rs.randint(4, length + 1, (batch, 1))
        mask = (np.arange(length)[None] < lengths).astype(np.int32)
        b = dict(input_ids=ids * mask, attention_mask=mask, labels=np.where(mask == 1, ids, -100).astype(np.int32),
                 weights=np.ones(batch, np.float32))
        if i == 2:
            b["segment_ids"] = (mask * (1 + (np.arange(length)[None] >= 5))).astype(np.int32)
            b["weights"][-2:] = 0.0
        out.append(b)
    return out


def image_batches(steps: int = 4, batch: int = 8) -> list[dict]:
    rs = np.random.RandomState(0)
    out = []
    for i in range(steps):
        b = dict(pixel_values=rs.normal(size=(batch, 2, 12, 8)).astype(np.float32),
                 labels=rs.randint(0, 4, (batch,)).astype(np.int32), weights=np.ones(batch, np.float32))
        if i == 2:
            b["weights"][-2:] = 0.0
        out.append(b)
    return out


def train(plan, config: dict, task: str, batches, lr: float = 1e-3):
    """`len(batches)` AdamW steps on `plan` -> (state, losses)."""
    import optax

    import jaxtune
    from jaxtune.tasks import make_loss_fn
    from jaxtune.train import make_train_step

    model = jaxtune.from_config(dict(config), task=task, shardings=plan.param_shardings)
    _, params, _ = jaxtune.models.split(model)
    tx = optax.adamw(lr, weight_decay=0.01)
    state = plan.create_state(params, tx, rng=0)
    step = plan.jit_train_step(make_train_step(make_loss_fn(model), tx), state)
    losses = []
    for b in batches:
        state, metrics = step(state, plan.shard_batch(b))
        losses.append(float(metrics["loss"]))  # wait for each step (see jaxtune.parallel's docstring)
    return state, losses
