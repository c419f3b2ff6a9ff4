"""QLoRA's frozen base: kernels stored quantized (int8 or NF4) with blockwise scales.

    q = quantize(w, "nf4")      # a QTensor: codes + one float32 scale per block of 64 values
    w2 = q[...]                 # dequantized (w's shape and dtype): what the matmul uses

A QTensor is a pytree (codes, scale) with the logical shape and dtype as static data, so it sits
in an `nnx.Param` where the float kernel was: the layer's own `self.kernel[...]` (nnx's
Variable indexing) returns the dequantized kernel inside the jitted step, and the base's path
(`.../query/kernel`) stays what key tables and checkpoints know.

Blocks: the kernel flattened row-major, in blocks of 64 consecutive values (zero-padded), each
scaled by its absolute maximum (bitsandbytes' blockwise scheme, without QLoRA's second
quantization of the scales). int8: round(w / absmax * 127). NF4: the nearest of the 16
NormalFloat levels of the QLoRA paper (Dettmers et al. 2023, appendix E), stored as `uint4`.

Why `uint4` and not two codes packed per uint8 by hand: XLA CPU stores sub-byte types packed (the
compiled memory analysis counts 0.5 byte per uint4 value; tests/models/test_qlora.py holds this),
so NF4 costs 4 bits + 32 bits / 64 = 4.5 bits per weight, 14% of float32.

Why not qwix (Google's JAX quantization library): its `QArray` / `quantize` would serve, but its
LoRA integration intercepts the model's calls (a provider), which the in-place LoRA layers here
do not need, and for storage alone ~60 lines here avoid a dependency (qwix is not installed
with jaxtune) while keeping the same NF4 levels and the same uint4 storage.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

BLOCK = 64
KINDS = ("int8", "nf4")

NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


@jax.tree_util.register_pytree_node_class
class QTensor:
    """A quantized array: `codes` (blocks, BLOCK) int8 / uint4, `scale` (blocks, 1) float32."""

    def __init__(self, codes, scale, shape: tuple, dtype: Any, kind: str):
        self.codes, self.scale = codes, scale
        self.shape, self.dtype, self.kind = tuple(shape), jnp.dtype(dtype), kind

    def tree_flatten(self):
        return (self.codes, self.scale), (self.shape, self.dtype.name, self.kind)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """The bytes the stored codes and scales take (uint4: half a byte per code)."""
        bits = 4 if self.kind == "nf4" else 8
        return self.codes.size * bits // 8 + self.scale.size * 4

    def dequantize(self) -> jax.Array:
        if self.kind == "nf4":
            values = jnp.asarray(NF4_LEVELS)[self.codes.astype(jnp.int32)]
        else:
            values = self.codes.astype(jnp.float32)
        flat = (values * self.scale).reshape(-1)[: self.size]
        return flat.reshape(self.shape).astype(self.dtype)

    def __getitem__(self, index):
        return self.dequantize()[index]

    def __repr__(self) -> str:
        return f"QTensor({self.kind}, shape={self.shape}, dtype={self.dtype.name})"


def quantize(w, kind: str) -> QTensor:
    """`w` (any shape, floating) as a QTensor of `kind` ('int8' or 'nf4')."""
    if kind not in KINDS:
        raise ValueError(f"quantize: kind must be one of {KINDS}, got {kind!r}")
    w = jnp.asarray(w)
    flat = w.reshape(-1).astype(jnp.float32)
    pad = (-flat.size) % BLOCK
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
    safe = jnp.where(absmax == 0, 1.0, absmax)
    if kind == "int8":
        codes = jnp.clip(jnp.round(blocks / safe * 127), -127, 127).astype(jnp.int8)
        scale = safe / 127
    else:
        codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), blocks / safe).astype(jnp.uint4)
        scale = safe
    q = QTensor(codes, scale.astype(jnp.float32), w.shape, w.dtype, kind)
    sharding = getattr(w, "sharding", None)
    if isinstance(sharding, NamedSharding):  # replicated on w's mesh, as the sharding rules place a QTensor
        q = jax.device_put(q, jax.tree.map(lambda _: NamedSharding(sharding.mesh, PartitionSpec()), q))
    return q


def is_quantized(x) -> bool:
    return isinstance(x, QTensor)


__all__ = ["BLOCK", "KINDS", "NF4_LEVELS", "QTensor", "is_quantized", "quantize"]
