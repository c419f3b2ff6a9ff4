"""The convolutional building blocks the image families share: a Conv2d, PyTorch's BatchNorm2d
(running statistics as `nnx.BatchStat`s) and the pools, all NHWC inside.

PyTorch's layouts and semantics are kept where a checkpoint or a parity test can see them:
- `Conv2d.kernel` is (kh, kw, in, out) (HWIO, what `lax.conv_general_dilated` takes for NHWC);
  PyTorch's weight is (out, in, kh, kw) (OIHW); the key tables convert.
- `BatchNorm2d` normalises a train batch by its biased variance and moves the running variance
  toward the unbiased one, with PyTorch's momentum convention
  (`running = (1 - momentum) * running + momentum * batch`), and counts `num_batches_tracked`.
  The statistics are means over the whole batch axis: under `jit` with a batch sharded over a
  data-parallel mesh they are the global batch's (XLA reduces across devices), never per device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Logical axis name of a layer's channels (output channels of a convolution): 'embed' is split
# over the FSDP mesh axis like a transformer's width.
CHANNELS = "embed"


class Conv2d(nnx.Module):
    """PyTorch's Conv2d (zero padding, no groups) on NHWC input; `kernel` (kh, kw, in, out)."""

    def __init__(self, din: int, dout: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
                 use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        # kaiming normal, fan_out, relu gain (what torchvision and transformers' ResNet use)
        std = math.sqrt(2.0 / (dout * kernel_size * kernel_size))
        shape = (kernel_size, kernel_size, din, dout)
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), shape, param_dtype),
                                logical_axes=(None, None, None, CHANNELS))
        self.bias = (nnx.Param(jnp.zeros((dout,), param_dtype), logical_axes=(CHANNELS,))
                     if use_bias else None)
        self.stride, self.padding, self.dtype = stride, padding, dtype

    def __call__(self, x_BHWC):
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x_BHWC.astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(self.dtype) if self.bias is not None else y


class BatchNorm2d(nnx.Module):
    """PyTorch's BatchNorm2d over the channels of NHWC input (see the module docstring).

    Params `scale` / `bias` (PyTorch's weight / bias); batch statistics `running_mean`,
    `running_var` (float32) and `num_batches_tracked` (int32), updated in place in train mode.
    """

    def __init__(self, features: int, *, momentum: float = 0.1, eps: float = 1e-5,
                 param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=(CHANNELS,))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=(CHANNELS,))
        self.running_mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.momentum, self.eps = momentum, eps

    def __call__(self, x_BHWC, *, use_running_average: bool):
        if use_running_average:
            mean, var = self.running_mean[...], self.running_var[...]
        else:
            x32 = x_BHWC.astype(jnp.float32)
            mean = jnp.mean(x32, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))  # biased: what normalises
            n = x_BHWC.shape[0] * x_BHWC.shape[1] * x_BHWC.shape[2]
            m = self.momentum
            # the running variance is the unbiased estimate, as PyTorch keeps it
            self.running_mean.value = (1 - m) * self.running_mean[...] + m * mean
            self.running_var.value = (1 - m) * self.running_var[...] + m * var * (n / max(n - 1, 1))
            self.num_batches_tracked.value = self.num_batches_tracked[...] + 1
        inv = jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        shift = self.bias[...].astype(jnp.float32) - mean * inv
        return (x_BHWC * inv.astype(x_BHWC.dtype) + shift.astype(x_BHWC.dtype)).astype(x_BHWC.dtype)


def max_pool(x_BHWC, window: int, stride: int, padding: int):
    """PyTorch's MaxPool2d (padding never wins: it is -inf)."""
    p = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x_BHWC, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                 (1, stride, stride, 1), p)


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): output i averages inputs floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1,
    PyTorch's adaptive pooling windows (which overlap, or repeat inputs, when n_out > n_in)."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x_BHWC, out_hw: tuple[int, int]):
    """PyTorch's adaptive_avg_pool2d to `out_hw`, also to a larger size (timm's VGG head pools a
    small feature map UP to 7 x 7): a fixed averaging matrix per spatial axis."""
    ph = jnp.asarray(_adaptive_pool_matrix(x_BHWC.shape[1], out_hw[0]), x_BHWC.dtype)
    pw = jnp.asarray(_adaptive_pool_matrix(x_BHWC.shape[2], out_hw[1]), x_BHWC.dtype)
    return jnp.einsum("ih,jw,bhwc->bijc", ph, pw, x_BHWC, precision=jax.lax.Precision.HIGHEST)


def nchw_to_nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


def conv_weight_to_torch(a):
    """(kh, kw, in, out) -> PyTorch's (out, in, kh, kw) (numpy arrays)."""
    return a.transpose(3, 2, 0, 1).copy() if a.ndim == 4 else a


def conv_weight_from_torch(a):
    """PyTorch's (out, in, kh, kw) -> (kh, kw, in, out)."""
    return a.transpose(2, 3, 1, 0).copy() if a.ndim == 4 else a


__all__ = ["BatchNorm2d", "CHANNELS", "Conv2d", "adaptive_avg_pool", "conv_weight_from_torch", "conv_weight_to_torch",
           "max_pool", "nchw_to_nhwc", "nhwc_to_nchw"]
