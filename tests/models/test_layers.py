"""Shared layers against PyTorch: the exact GELU (values and gradient, saturation, NaN)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxtune.models.core import ACTIVATIONS


def test_exact_gelu_matches_torch_values_and_gradient():
    saturated = [-1e4, -40.0, 40.0, 1e4, 0.0]
    x = np.concatenate([np.linspace(-12, 12, 4001), saturated]).astype(np.float32)
    gelu = ACTIVATIONS["gelu"]
    ours, grad = jax.vmap(jax.value_and_grad(gelu))(jnp.asarray(x))
    xt = torch.from_numpy(x).requires_grad_()
    ref = torch.nn.functional.gelu(xt)
    ref.sum().backward()
    np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), atol=2e-6, rtol=1e-6)
    assert np.isnan(np.asarray(gelu(jnp.float32(np.nan))))  # the no-op `where` hides nothing
