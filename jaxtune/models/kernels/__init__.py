"""The compute kernels every family calls, chosen per backend when a model is traced.

Two implementations of the same functions, with the same values (tests/models/test_kernels.py):

- `cpu` (`kernels/cpu.py`): formulations tuned for XLA CPU (heads-major attention kept apart by
  optimization barriers, a hand-written dense-layer backward, a GELU XLA CPU fuses well). The
  default when `jax.default_backend() == "cpu"`.
- `xla` (`kernels/xla.py`): `jax.nn.dot_product_attention`, plain `lax.dot_general` with XLA's own
  derivatives, `jax.nn.gelu`. The default on GPUs and TPUs.

The choice is made when a function is traced: `with kernels.use("xla"): ...` (innermost wins),
else the environment variable `JAXTUNE_KERNELS=cpu|xla`, else the backend. `jax.jit` caches
traces, so choose before the first call of a jitted function (a new `use` does not retrace an
already compiled one).

>>> with use("xla"):
...     current()
'xla'
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional

import jax

from jaxtune.errors import JaxtuneError
from jaxtune.models.kernels import cpu, xla

KERNELS = {"cpu": cpu, "xla": xla}
ENV_VAR = "JAXTUNE_KERNELS"

_CHOICE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("jaxtune_kernels", default=None)


def _check(name: str, source: str) -> str:
    if name not in KERNELS:
        raise JaxtuneError(f"{source}={name!r} is not a kernel set; choose one of: {', '.join(KERNELS)}")
    return name


def current() -> str:
    """The kernel set a model traced now uses: 'cpu' or 'xla'."""
    chosen = _CHOICE.get()
    if chosen is not None:
        return chosen
    env = os.environ.get(ENV_VAR)
    if env:
        return _check(env.strip().lower(), ENV_VAR)
    return "cpu" if jax.default_backend() == "cpu" else "xla"


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Trace models inside this block with the kernel set `name` ('cpu' or 'xla')."""
    token = _CHOICE.set(_check(name, "kernels.use"))
    try:
        yield
    finally:
        _CHOICE.reset(token)


@contextlib.contextmanager
def plain_autodiff() -> Iterator[None]:
    """Trace models inside this block with XLA's own dense-layer derivatives.

    The CPU kernels' dense layers have a custom reverse-mode rule (see `cpu.dense_dot_general`);
    JAX cannot apply forward mode (`jax.jvp`, `jax.linearize`, `jax.hessian`) to such a rule. Call
    or jit the model inside `with jaxtune.models.plain_autodiff():` for those; the values are the
    same. (The `xla` kernels have no custom rule; there this changes nothing.)
    """
    token = cpu.DENSE_BACKWARD.set(False)
    try:
        yield
    finally:
        cpu.DENSE_BACKWARD.reset(token)


def dot_product_attention(q_BTNH, k_BSNH, v_BSNH, bias=None, *, dropout_rate: float = 0.0,
                          deterministic: bool = True, rng=None, scale: Optional[float] = None,
                          query_rows: Optional[int] = None):
    """Softmax attention, (batch, queries, heads, head_dim) layout; bias broadcasts to BNTS.

    Softmax runs in float32 whatever the compute dtype. One function for every family, so a
    faster formulation lands everywhere at once. `scale` defaults to 1 / sqrt(head_dim).
    `query_rows`: the queries are the first rows of a self-attention over that many (a layer
    that computes only the first token); dropout then draws the mask those rows would get.
    """
    return KERNELS[current()].dot_product_attention(
        q_BTNH, k_BSNH, v_BSNH, bias, dropout_rate=dropout_rate, deterministic=deterministic, rng=rng,
        scale=scale, query_rows=query_rows)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      out_sharding=None):
    """`nnx.Linear`'s dot_general (see `jaxtune.models.layers.linear`)."""
    return KERNELS[current()].dense_dot_general(
        lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type,
        out_sharding=out_sharding)


def frozen_dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                             out_sharding=None):
    """`dense_dot_general` for a kernel never differentiated (LoRA's frozen base): input gradient only."""
    return KERNELS[current()].frozen_dense_dot_general(
        lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type,
        out_sharding=out_sharding)


def gelu_exact(x):
    """PyTorch's exact GELU, `x/2 * (1 + erf(x/sqrt 2))`."""
    return KERNELS[current()].gelu_exact(x)


__all__ = ["ENV_VAR", "KERNELS", "current", "dense_dot_general", "dot_product_attention", "frozen_dense_dot_general",
           "gelu_exact",
           "plain_autodiff", "use"]
