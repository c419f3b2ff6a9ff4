"""The layers every family builds from: parameters with logical axis names, attention blocks,
the layer stack. The arithmetic that differs per backend (attention, dense layers, GELU) is in
`jaxtune.models.kernels`.

Conventions every family follows (the optimizer, sharding and I/O rely on them):

- Parameters are `nnx.Param`s whose metadata `logical_axes` names each dimension
  (`vocab`, `embed`, `mlp`, `heads`, `kv`, `position`, `type`, `classes`, ...), or None.
  `jaxtune.parallel` maps these names to mesh axes; no model code mentions a mesh.
- Leaf names: `nnx.Linear` -> `kernel` (in, out) / `bias`; `nnx.LayerNorm` -> `scale` / `bias`;
  `nnx.Embed` -> `embedding`. Weight-decay masks key on these names.
- Module attributes are named like the Hugging Face modules, so a jaxtune path such as
  `bert/encoder/layer/3/attention/self/query/kernel` maps mechanically to the HF key
  `bert.encoder.layer.3.attention.self.query.weight` (see `jaxtune.models.family.KeyRule`).
- A model is called like its HF twin: `model(input_ids=..., attention_mask=...)` returns a
  `ModelOutput` with `.logits` (heads) or `.last_hidden_state` (base models). Training mode is
  `deterministic=False` with `rngs=` a PRNG key for dropout.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models import kernels
from jaxtune.models.config import ConfigBase
from jaxtune.models.dropout import KeySplitter


def normal(std: float):
    return nnx.initializers.normal(stddev=std)


def linear(
    cfg: ConfigBase, din: int, dout: int, axes: tuple, *, rngs: nnx.Rngs, std: float = 0.02,
    use_bias: bool = True,
) -> nnx.Linear:
    """An nnx.Linear whose kernel (din, dout) and bias (dout,) carry logical axis names."""
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dot_general=kernels.dense_dot_general,
        dtype=cfg.activation_dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=normal(std),
        bias_init=nnx.initializers.zeros_init(),
        kernel_metadata={"logical_axes": tuple(axes)},
        bias_metadata={"logical_axes": (axes[1],)},
        rngs=rngs,
    )


def embed(cfg: ConfigBase, num: int, dim: int, axes: tuple, *, rngs: nnx.Rngs, std: float = 0.02,
          init: Optional[Callable] = None):
    """An nnx.Embed (num, dim) with logical axis names; `init` replaces the normal(std) initialiser."""
    return nnx.Embed(
        num,
        dim,
        dtype=cfg.activation_dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=init or normal(std),
        embedding_metadata={"logical_axes": tuple(axes)},
        rngs=rngs,
    )


def layer_norm(cfg: ConfigBase, dim: int, eps: float, *, rngs: nnx.Rngs, axis: str = "embed"):
    # Exact variance (not E[x^2] - E[x]^2) so fp32 matches PyTorch to 1e-5.
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=cfg.activation_dtype,
        param_dtype=cfg.param_dtype,
        use_fast_variance=False,
        scale_metadata={"logical_axes": (axis,)},
        bias_metadata={"logical_axes": (axis,)},
        rngs=rngs,
    )


def attention_bias(mask_BS: Optional[jax.Array], dtype) -> Optional[jax.Array]:
    """(batch, keys) 1/0 mask -> additive (batch, 1, 1, keys) bias: 0 where kept, -big where masked."""
    if mask_BS is None:
        return None
    return jnp.where(mask_BS[:, None, None, :].astype(bool), 0.0, jnp.finfo(dtype).min).astype(dtype)


def call_layer(remat: bool, layer: nnx.Module, *args, deterministic: bool, **static):
    """`layer(*args, deterministic=..., **static)`, rematerialised in the backward pass when `remat`.

    `static`: Python values (not arrays) the layer takes as keywords, e.g. `first_token_only`.
    """
    if not remat:
        return layer(*args, deterministic=deterministic, **static)
    return nnx.remat(lambda mod, *a: mod(*a, deterministic=deterministic, **static))(layer, *args)


def run_layers(layers, remat: bool, x, *args, keys: "KeySplitter", deterministic: bool,
               output_hidden_states: bool = False, first_token_only: bool = False):
    """An encoder's layer stack: `layer(x, *args, next key)` in turn -> (x, hidden states or None).

    `first_token_only`: the last layer computes the first token only (its output is (B, 1, D)).
    """
    hidden = [x]
    for i, layer in enumerate(layers):
        last = first_token_only and i == len(layers) - 1
        x = call_layer(remat, layer, x, *args, keys(), deterministic=deterministic, first_token_only=last)
        hidden.append(x)
    return x, (tuple(hidden) if output_hidden_states else None)


def self_attention(query: nnx.Module, key: nnx.Module, value: nnx.Module, x_BTD: jax.Array,
                   bias: Optional[jax.Array], num_heads: int, *, dropout_rate: float, deterministic: bool,
                   rng: Optional[jax.Array], first_token_only: bool = False) -> jax.Array:
    """Multi-head self-attention through the projections `query`, `key`, `value` -> (B, Q, D),
    before any output projection. `first_token_only`: queries (and the output) for the first
    token only (Q = 1); keys and values still come from every token."""
    B, T, _ = x_BTD.shape
    x_BQD = x_BTD[:, :1] if first_token_only else x_BTD

    def heads(h):  # (B, rows, D) -> (B, rows, N, H)
        return h.reshape(B, h.shape[1], num_heads, -1)

    out_BQNH = kernels.dot_product_attention(
        heads(query(x_BQD)), heads(key(x_BTD)), heads(value(x_BTD)), bias,
        dropout_rate=dropout_rate, deterministic=deterministic, rng=rng, query_rows=T,
    )
    return out_BQNH.reshape(B, x_BQD.shape[1], -1)


class SelfAttention(nnx.Module):
    """HF's BertSelfAttention / ViTSelfAttention: the `query`, `key`, `value` projections and the
    attention (the output projection is the caller's)."""

    def __init__(self, cfg: ConfigBase, *, rngs: nnx.Rngs, use_bias: bool = True):
        D, std = cfg.hidden_size, cfg.initializer_range
        self.num_heads = cfg.num_attention_heads
        self.query = linear(cfg, D, D, ("embed", "heads"), rngs=rngs, std=std, use_bias=use_bias)
        self.key = linear(cfg, D, D, ("embed", "heads"), rngs=rngs, std=std, use_bias=use_bias)
        self.value = linear(cfg, D, D, ("embed", "heads"), rngs=rngs, std=std, use_bias=use_bias)
        self.dropout_rate = cfg.attention_probs_dropout_prob

    def __call__(self, x_BTD, bias=None, *, deterministic, rng, first_token_only=False):
        """`first_token_only`: queries (and the output) for the first token only; keys all."""
        return self_attention(self.query, self.key, self.value, x_BTD, bias, self.num_heads,
                              dropout_rate=self.dropout_rate, deterministic=deterministic, rng=rng,
                              first_token_only=first_token_only)


class LayerStack(nnx.Module):
    """An encoder's blocks under `layer` (HF's `encoder.layer.i`), run in turn by `run_layers`."""

    def __init__(self, cfg: ConfigBase, block: Callable[..., nnx.Module], *, rngs: nnx.Rngs):
        self.layer = nnx.List([block(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.remat = cfg.remat

    def __call__(self, x_BTD, *args, deterministic, keys, output_hidden_states=False, first_token_only=False):
        return run_layers(self.layer, self.remat, x_BTD, *args, keys=keys, deterministic=deterministic,
                          output_hidden_states=output_hidden_states, first_token_only=first_token_only)

