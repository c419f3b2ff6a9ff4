"""Kernels tuned for XLA CPU (the default when `jax.default_backend() == "cpu"`).

Each formulation here computes what `kernels.xla` computes; it is written the way XLA CPU runs
fastest, and the comments keep the measurements that chose it (MiniLM, batch 32, seq 128, 2
cores; see tools/bench.py). On GPUs and TPUs the barriers and the custom backward only get in
XLA's way, so `jaxtune.models.kernels` picks `kernels.xla` there.
"""

from __future__ import annotations

import contextvars
import math
from typing import Optional

import jax
import jax.numpy as jnp

from jaxtune.models.dropout import dropout

# Whether `dense_dot_general` traces with the hand-written backward below; `plain_autodiff()`
# turns it off where forward-mode differentiation (jax.jvp, jax.hessian) of a model is needed.
DENSE_BACKWARD = contextvars.ContextVar("jaxtune_dense_backward", default=True)


def gelu_exact(x):
    """PyTorch's `x/2 * (1 + erf(x/sqrt 2))`; equal to jax.nn.gelu(approximate=False) to 1e-6.

    Why not jax.nn.gelu: it goes through erfc, which XLA CPU expands into two polynomials and an
    exp (8.1 ms vs 1.7 ms on a (32, 128, 1536) block). The final `where` (both branches equal on
    erf's [-1, 1]) keeps the whole GELU out of the next matmul's YNNPACK fusion: without it XLA
    put the `x/2 * (1 + erf)` tail there and materialised two (32, 128, 1536) constant broadcasts
    for it, ~60 ms of a 650 ms MiniLM eval step on 2 cores.
    """
    erf = jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype))
    half_x = x * 0.5
    return jnp.where(jnp.abs(erf) <= 1, half_x * (1.0 + erf), half_x * (1.0 + jnp.sign(erf)))


@jax.custom_vjp
def _dense(x, kernel):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x, kernel):
    return _dense(x, kernel), (x, kernel)


def _dense_bwd(residuals, g):
    x, kernel = residuals
    # Without the barrier XLA CPU fuses the producer of `g` (layer-norm backward, dropout mask...)
    # into the transposed copy that feeds the kernel-gradient matmul, and that fusion walks all
    # its inputs with a stride of the feature size: ~25 ms for a (4096, 384) MiniLM activation.
    x, g = jax.lax.optimization_barrier((x, g))
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    # As a 2-D (rows, in) x (rows, out) contraction: over several leading dims XLA transposes
    # both operands with slower copies.
    rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dkernel = jax.lax.dot_general(rows_x, rows_g, (((0,), (0,)), ((), ())))
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      out_sharding=None):
    """`nnx.Linear`'s dot_general: `x @ kernel` with the hand-written backward above (MiniLM
    train step ~12% faster on 2 CPU cores); anything else goes to `lax.dot_general`."""
    plain = (dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
             and precision is None and preferred_element_type is None and out_sharding is None)
    if plain and DENSE_BACKWARD.get():
        return _dense(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding)


@jax.custom_vjp
def _frozen_dense(x, kernel):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _frozen_dense_fwd(x, kernel):
    return _frozen_dense(x, kernel), kernel


def _frozen_dense_bwd(kernel, g):
    # A frozen kernel (LoRA's base): the input gradient only, with `_dense_bwd`'s barrier. XLA's own
    # transpose of the dot fused g's producer into a strided copy as described there; and the
    # residuals are the kernel alone, not the (rows, in) activation.
    (g,) = jax.lax.optimization_barrier((g,))
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    return dx.astype(g.dtype), None


_frozen_dense.defvjp(_frozen_dense_fwd, _frozen_dense_bwd)


def frozen_dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                             out_sharding=None):
    """`dense_dot_general` for a kernel that is never differentiated (LoRA's frozen base): its
    backward computes no kernel gradient (None: a symbolic zero)."""
    plain = (dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
             and precision is None and preferred_element_type is None and out_sharding is None)
    if plain and DENSE_BACKWARD.get():
        return _frozen_dense(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding)


def dot_product_attention(q_BTNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array, bias: Optional[jax.Array] = None,
                          *, dropout_rate: float = 0.0, deterministic: bool = True, rng: Optional[jax.Array] = None,
                          scale: Optional[float] = None, query_rows: Optional[int] = None) -> jax.Array:
    """Softmax attention for XLA CPU; the contract is `jaxtune.models.kernels.dot_product_attention`.

    Why heads-major and the barriers: on XLA CPU, the einsums in BTNH layout fuse with the softmax
    into one slow kernel. Moving to (batch, heads, T, H) first and keeping the two matmuls and the
    softmax apart made the MiniLM forward 1.33x faster (eval 40.5 -> 53.7 ex/s, batch 32, seq 128,
    2 cores) and the train step 1.08x; see tools/bench.py.

    Why the softmax is normalised after the second matmul: `(exp @ v) / sum` equals
    `(exp / sum) @ v` but divides a (B, N, T, H) tensor instead of the (B, N, T, S) one, and on XLA
    CPU the matmul can then read the exponentials as they are made: the attention took 8.9 ms
    instead of 14.6 per MiniLM layer (batch 32, seq 128) and the eval step ~7% less time. Dropout
    on the unnormalised weights is the same dropout (the mask and scale commute with the division).
    """
    dtype = q_BTNH.dtype
    scale = 1.0 / math.sqrt(q_BTNH.shape[-1]) if scale is None else scale
    barrier = jax.lax.optimization_barrier
    q_BNTH, k_BNSH, v_BNSH = barrier(tuple(
        a.transpose(0, 2, 1, 3) for a in (q_BTNH * jnp.asarray(scale, dtype), k_BSNH, v_BSNH)))
    scores_BNTS = barrier(jnp.einsum("bnth,bnsh->bnts", q_BNTH, k_BNSH)).astype(jnp.float32)
    if bias is not None:
        scores_BNTS = scores_BNTS + bias.astype(jnp.float32)
    # softmax's own max shift (constant per row, so no gradient flows through it)
    exp_BNTS = jnp.exp(scores_BNTS - jax.lax.stop_gradient(scores_BNTS.max(axis=-1, keepdims=True)))
    sum_BNT1 = exp_BNTS.sum(axis=-1, keepdims=True)
    exp_BNTS = exp_BNTS.astype(dtype)
    if not deterministic and dropout_rate > 0.0:
        B, N, T, S = exp_BNTS.shape
        exp_BNTS = dropout(exp_BNTS, dropout_rate, rng, within=(B, N, query_rows or T, S))
    # float32 out of the matmul: before the division it sums up to S rows of v (float16 overflows)
    out_BNTH = barrier(jnp.einsum("bnts,bnsh->bnth", barrier(exp_BNTS), v_BNSH,
                                  preferred_element_type=jnp.float32)) / sum_BNT1
    return out_BNTH.astype(dtype).transpose(0, 2, 1, 3)
