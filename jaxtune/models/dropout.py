"""Dropout and the PRNG keys that drive it: explicit keys, so train steps stay pure functions.

`dropout` draws its own 16-bit uniform numbers (four per threefry2x32 evaluation) and can draw, for
a layer that computes only the first rows of a tensor, the mask the whole tensor would get there.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.random import threefry2x32_p


def _uniform_u16(rng: jax.Array, shape: tuple, within: Optional[tuple] = None) -> jax.Array:
    """Uniform integers in [0, 65536) (as uint32), four per threefry2x32 evaluation.

    `jax.random.bernoulli` spends a whole threefry2x32 evaluation (two 32-bit words) per element,
    which made dropout's random numbers about a fifth of a BERT train step on CPU. Here each
    evaluation's two words give four 16-bit numbers. Non-threefry keys take `jax.random.bits`.
    `within`: return the leading `shape` corner of the numbers drawn for this larger shape
    (same last dimension); threefry keys compute only that corner, other keys draw it all.
    """
    within = tuple(shape) if within is None else tuple(within)
    if len(within) != len(shape) or (shape and within[-1] != shape[-1]) or any(
            s > w for s, w in zip(shape, within)):
        raise ValueError(f"dropout shape {tuple(shape)} is not a leading corner of {within} "
                         "with the same last dimension")
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(rng)) != "threefry2x32":
            bits = jax.random.bits(rng, within, jnp.uint16).astype(jnp.uint32)
            return bits[tuple(slice(0, s) for s in shape)]
        k1, k2 = jax.random.key_data(rng)
    else:  # a raw uint32[2] key (jax.random.PRNGKey)
        k1, k2 = rng[0], rng[1]
    *lead, last = shape or (1,)
    counts = (*lead, -(-last // 4))
    full_counts = (*within[:-1], counts[-1]) if shape else counts
    index = jnp.zeros(counts, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(counts))):  # each count's row-major position in `within`
        index = index + jax.lax.broadcasted_iota(jnp.uint32, counts, axis) * jnp.uint32(stride)
        stride *= full_counts[axis]
    words = jnp.stack(threefry2x32_p.bind(k1, k2, jnp.zeros_like(index), index), axis=-1)
    # Each (w1, w2) pair read as four adjacent 16-bit numbers: a bitcast, which XLA fuses into the
    # consumer. Concatenating shifted halves instead made XLA CPU materialise the concatenation
    # (34 -> 10 ms for MiniLM's attention-probability dropout, (32, 12, 128, 128)).
    u16 = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, -1)
    return u16[..., :last].reshape(shape).astype(jnp.uint32)


def dropout(x: jax.Array, rate: float, rng: jax.Array, *, within: Optional[tuple] = None) -> jax.Array:
    """Zero each element with probability `rate` and scale the rest to keep the expectation.

    `rate` is rounded to a multiple of 1/65536 (0.1 -> 0.100006); the scale uses the rounded
    value, so the expectation is exact. `within`: `x` is the leading corner of a tensor of this
    shape (a layer that computes only the first token) and gets the mask that tensor would get
    there, so computing fewer rows leaves the random stream of the rows kept unchanged.
    """
    threshold = round(rate * 65536)
    keep = _uniform_u16(rng, x.shape, within) >= threshold
    return jnp.where(keep, x * (65536.0 / (65536 - threshold)), 0).astype(x.dtype)


class Dropout(nnx.Module):
    """Dropout driven by an explicit key, so train steps stay pure functions of (state, batch)."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, x, *, deterministic: bool, rng: Optional[jax.Array], within: Optional[tuple] = None):
        if deterministic or self.rate == 0.0:
            return x
        if rng is None:
            raise ValueError("dropout in training mode needs rngs=<PRNG key>")
        return dropout(x, self.rate, rng, within=within)


class KeySplitter:
    """Hands out fresh keys from one PRNG key: `keys()`; None in eval mode."""

    def __init__(self, rng: Optional[jax.Array]):
        self._rng, self._count = rng, 0

    def __call__(self) -> Optional[jax.Array]:
        if self._rng is None:
            return None
        self._count += 1
        return jax.random.fold_in(self._rng, self._count)


# fold_in data for a task head's dropout stream, apart from the base model's 1, 2, ... (uint32).
HEAD_STREAM = 2**31 - 1


def head_keys(key: Optional[jax.Array]) -> KeySplitter:
    """Dropout keys for a task head, independent of those its base model used."""
    return KeySplitter(None if key is None else jax.random.fold_in(key, HEAD_STREAM))


def as_key(rngs) -> Optional[jax.Array]:
    """Accept a PRNG key, an nnx.Rngs (its 'dropout' stream) or None."""
    if rngs is None or isinstance(rngs, jax.Array):
        return rngs
    if isinstance(rngs, nnx.Rngs):
        return rngs["dropout"]() if "dropout" in rngs else rngs.default()
    raise TypeError(f"rngs must be a PRNG key or nnx.Rngs, got {type(rngs).__name__}")
