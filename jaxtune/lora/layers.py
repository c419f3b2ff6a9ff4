"""The adapted layers: a targeted module keeps its own parameters and gains `lora_a`, `lora_b`.

`adapt(module, ...)` turns a module with a `kernel` of shape (in, *out) (an `nnx.Linear`, GPT-2's
fused `c_attn`) into its LoRA twin IN PLACE: its class becomes a subclass of its own class that
adds `x @ A @ B * alpha / rank` to what the module returns. In place, so nothing is copied, every
existing path (`.../query/kernel`) stays what the key tables, shardings and checkpoints know, and
the base Variables are the very arrays loading placed on their shardings.

Why the base matmul is `kernels.frozen_dense_dot_general`: the CPU kernels' dense layer has a
custom VJP whose backward computes the kernel gradient too; for a frozen kernel that gradient is
dead code. XLA's own derivative (the first version here) computes only the input gradient but
measured slower than the full fine-tune's step on CPU (0.8x); the frozen rule keeps the CPU
kernels' layout and barrier and returns no kernel gradient at all.

Adapter dropout (PEFT's `lora_dropout`, on the adapter's input only) takes its keys from
`dropout_keys(rng)`, a context the LoRA loss function opens around the model call: `nnx.Linear`
is called without `deterministic` / `rngs`, and evaluation (no context) is deterministic.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models import kernels
from jaxtune.models.dropout import dropout

LORA_LEAVES = ("lora_a", "lora_b")

# fold_in data of the adapters' dropout stream, apart from the model's own keys
LORA_STREAM = 2**31 - 2

_KEY: contextvars.ContextVar[Optional[jax.Array]] = contextvars.ContextVar("jaxtune_lora_dropout", default=None)


@contextlib.contextmanager
def dropout_keys(rng: Optional[jax.Array]) -> Iterator[None]:
    """Adapters called inside draw their dropout masks from `rng` (None: no dropout)."""
    token = _KEY.set(None if rng is None else jax.random.fold_in(rng, LORA_STREAM))
    try:
        yield
    finally:
        _KEY.reset(token)


def frozen_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                       out_sharding=None):
    """`nnx.Linear`'s dot_general for a frozen kernel: the input gradient only (on CPU the tuned
    kernels' rule, with their barrier; XLA's own transpose there was slower, see `kernels.cpu`)."""
    return kernels.frozen_dense_dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                            preferred_element_type=preferred_element_type,
                                            out_sharding=out_sharding)


def lora_delta(module, x: jax.Array) -> jax.Array:
    """(..., in) -> (..., *out): `dropout(x) @ A @ B * scale`, in the module's compute dtype."""
    dtype = getattr(module, "dtype", None) or x.dtype
    a, b = module.lora_a[...].astype(dtype), module.lora_b[...].astype(dtype)
    h = x.astype(dtype)
    key = _KEY.get()
    if key is not None and module.lora_dropout > 0.0:
        h = dropout(h, module.lora_dropout, jax.random.fold_in(key, module.lora_id))
    # As (rows, in) @ (in, r) @ (r, out) matmuls: their gradients are then 2-D contractions over
    # rows, which XLA CPU runs without the transposed copies a contraction over (batch, seq) makes.
    rows = h.reshape(-1, h.shape[-1])
    low = rows @ a
    delta = (low @ b.reshape(b.shape[0], -1)) * jnp.asarray(module.lora_scale, dtype)
    return delta.reshape(*h.shape[:-1], *b.shape[1:])


def _dense(x, w):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def merged_dense(x, w, a, b, scale: float):
    """`x @ (W + scale * A @ B)`: a frozen kernel and its adapter in ONE matmul of x.

    Why: computing `x @ W + (x @ A) @ B * scale` writes and re-reads a (rows, out) delta and, in the
    backward, a (rows, in) input gradient of the adapter to add: memory passes over activations
    that cost about as much as the adapter's matmuls (MiniLM batch 32 x 64). Merging costs an
    (in, out) add per call. The backward computes the input gradient through the merged kernel,
    A's and B's gradients through the rank-r products, and no gradient for W (frozen).
    """
    return _dense(x, w + scale * (a @ b))


def _merged_fwd(x, w, a, b, scale):
    return merged_dense(x, w, a, b, scale), (x, w, a, b)


def _merged_bwd(scale, residuals, g):
    x, w, a, b = residuals
    x, g = jax.lax.optimization_barrier((x, g))  # as kernels.cpu's dense backward: no strided fusion
    dx = jax.lax.dot_general(g, w + scale * (a @ b), (((g.ndim - 1,), (1,)), ((), ())))
    rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    over_rows = (((0,), (0,)), ((), ()))  # 2-D contractions over rows: no transposed copies
    da = jax.lax.dot_general(rows_x, rows_g @ b.T, over_rows) * scale
    db = jax.lax.dot_general(rows_x @ a, rows_g, over_rows) * scale
    return dx.astype(x.dtype), None, da.astype(a.dtype), db.astype(b.dtype)


merged_dense.defvjp(_merged_fwd, _merged_bwd)


def _merged_linear(module, x):
    """An adapted `nnx.Linear` without adapter dropout (evaluation, or rate 0), as nnx.Linear
    computes it but through `merged_dense`; None where that does not apply."""
    if (not isinstance(module, nnx.Linear) or module.kernel.ndim != 2 or module.precision is not None
            or module.preferred_element_type is not None
            or (_KEY.get() is not None and module.lora_dropout > 0.0)):
        return None
    kernel = module.kernel[...]
    bias = module.bias[...] if module.bias is not None else None
    x, kernel, bias = module.promote_dtype((x, kernel, bias), dtype=module.dtype)
    a, b = module.lora_a[...].astype(kernel.dtype), module.lora_b[...].astype(kernel.dtype)
    y = merged_dense(x, kernel, a, b, float(module.lora_scale))
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def _add_delta(module, x, out):
    delta = lora_delta(module, x)
    if isinstance(out, tuple):  # a fused projection (GPT-2's c_attn -> q, k, v): one per slot
        axis = delta.ndim - (module.lora_b.ndim - 1)
        return tuple(o + jnp.take(delta, i, axis=axis).astype(o.dtype) for i, o in enumerate(out))
    return out + delta.astype(out.dtype)


def is_adapted(module) -> bool:
    return getattr(type(module), "lora_base", None) is not None


@functools.lru_cache(maxsize=None)
def lora_class(cls: type) -> type:
    """A subclass of `cls` whose call adds the adapter's output (one class per base class, so
    graphdefs compare equal). A direct subclass with no state of its own: Python lets an
    object's `__class__` change only between classes of the same layout."""
    if is_adapted(cls):
        return cls

    def __call__(self, x, *args, **kwargs):
        if not args and not kwargs:
            merged = _merged_linear(self, x)
            if merged is not None:
                return merged
        return _add_delta(self, x, cls.__call__(self, x, *args, **kwargs))

    return type(f"LoRA{cls.__name__}", (cls,), {"__call__": __call__, "lora_base": cls, "__module__": __name__})


def _axes(var) -> tuple:
    axes = var.get_metadata().get("logical_axes")
    return tuple(axes) if axes is not None else (None,) * var.ndim


def adapt(module: nnx.Module, *, rank: int, alpha: float, dropout_rate: float, key: jax.Array,
          lora_id: int) -> None:
    """Make `module` (kernel (in, *out)) a LoRA layer in place: A ~ U(+-1/sqrt(in)) as PEFT's
    kaiming_uniform(a=sqrt(5)), B = 0, so the adapted model starts equal to the base."""
    kernel = module.kernel
    din, out_shape = kernel.shape[0], tuple(kernel.shape[1:])
    axes = _axes(kernel)
    pdtype = kernel.dtype if jnp.issubdtype(kernel.dtype, jnp.floating) else jnp.float32
    bound = 1.0 / din ** 0.5
    a = jax.random.uniform(key, (din, rank), pdtype, -bound, bound)
    # the rank axis has no rule: replicated; A shards like the kernel's input, B like its output
    module.lora_a = nnx.Param(a, logical_axes=(axes[0], "lora_rank"))
    module.lora_b = nnx.Param(jnp.zeros((rank, *out_shape), pdtype), logical_axes=("lora_rank", *axes[1:]))
    module.lora_scale = float(alpha) / rank
    module.lora_dropout = float(dropout_rate)
    module.lora_id = int(lora_id)
    if isinstance(module, nnx.Linear):
        module.dot_general = frozen_dot_general
    module.__class__ = lora_class(type(module))


__all__ = ["LORA_LEAVES", "adapt", "dropout_keys", "frozen_dot_general", "is_adapted", "lora_class", "lora_delta"]
