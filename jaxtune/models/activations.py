"""Activation functions by their HF `hidden_act` names (exact GELU comes from `kernels`)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxtune.errors import ModelLoadError
from jaxtune.models import kernels


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": kernels.gelu_exact,
    "gelu_python": kernels.gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "linear": lambda x: x,
}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ModelLoadError(
            f"hidden_act '{name}' is not supported; supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]
