"""Kernels for GPUs and TPUs: what XLA (and cuDNN through `jax.nn`) already does well.

The same functions as `kernels.cpu`, with the same values: attention through
`jax.nn.dot_product_attention` (cuDNN's fused attention on a GPU where it takes the inputs, see
`attention_implementation`; else XLA's, float32 logits and softmax), dense layers as plain `lax.dot_general` with XLA's own derivatives, and GELU as
`jax.nn.gelu`. Attention dropout needs the probabilities themselves, so in training with
attention dropout the softmax is written out, with the mask `kernels.cpu` draws for the same key.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from jaxtune.models.dropout import dropout


def gelu_exact(x):
    """PyTorch's `x/2 * (1 + erf(x/sqrt 2))`."""
    return jax.nn.gelu(x, approximate=False)


dense_dot_general = jax.lax.dot_general
frozen_dense_dot_general = jax.lax.dot_general  # XLA drops the unused kernel gradient itself


def attention_implementation(q_BTNH: jax.Array, platform: str) -> str:
    """'cudnn' where cuDNN's fused (flash) attention takes the inputs: a GPU, bfloat16 or float16,
    head_dim a multiple of 8 up to 128; else 'xla'. (`jax.nn.dot_product_attention`'s own default,
    `implementation=None`, is always XLA in jax 0.10.) A shape cuDNN still refuses when traced
    falls back to XLA."""
    head_dim = q_BTNH.shape[-1]
    if platform == "gpu" and q_BTNH.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


def dot_product_attention(q_BTNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array, bias: Optional[jax.Array] = None,
                          *, dropout_rate: float = 0.0, deterministic: bool = True, rng: Optional[jax.Array] = None,
                          scale: Optional[float] = None, query_rows: Optional[int] = None) -> jax.Array:
    """Softmax attention for XLA GPU/TPU; the contract is `jaxtune.models.kernels.dot_product_attention`."""
    dtype = q_BTNH.dtype
    scale = 1.0 / math.sqrt(q_BTNH.shape[-1]) if scale is None else scale
    bias = None if bias is None else bias.astype(jnp.float32)
    if deterministic or dropout_rate == 0.0:
        if attention_implementation(q_BTNH, jax.default_backend()) == "cudnn":
            try:
                return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, None if bias is None else bias.astype(dtype),
                                                    scale=scale, implementation="cudnn")
            except (NotImplementedError, ValueError, RuntimeError):  # cuDNN refused these shapes or versions
                pass
        return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, bias, scale=scale, implementation="xla")
    # float32 logits whatever the compute dtype (float16 products of long rows overflow)
    scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        scores_BNTS = scores_BNTS + bias
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(dtype)
    B, N, T, S = probs_BNTS.shape
    probs_BNTS = dropout(probs_BNTS, dropout_rate, rng, within=(B, N, query_rows or T, S))
    return jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BSNH, preferred_element_type=jnp.float32).astype(dtype)
