"""Shared layers against PyTorch: the exact GELU (values and gradient, saturation, NaN) and the
attention (values and gradients, padding mask, dropout)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxtune.models.dropout import dropout
from jaxtune.models.kernels import dot_product_attention
from jaxtune.models.activations import ACTIVATIONS
from jaxtune.models.layers import attention_bias


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


def _attention_inputs(seed=0, batch=3, length=7, heads=2, head_dim=4):
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal((batch, length, heads, head_dim), dtype=np.float32) for _ in range(4))
    mask = np.ones((batch, length), np.int32)
    mask[1, 5:] = 0  # padding in one sequence
    mask[2, 2:] = 0
    return q, k, v, g, mask


def _softmax_attention(q, k, v, bias, drop=lambda probs: probs):
    """The textbook formula, softmax(q k^T / sqrt(d) + bias) @ v, with `drop` on the probabilities."""
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1]) + bias
    return jnp.einsum("bhts,bshd->bthd", drop(jax.nn.softmax(scores, axis=-1)), v)


def test_attention_matches_torch_values_and_gradients_with_padding():
    q, k, v, g, mask = _attention_inputs()

    def ours(q, k, v):
        out = dot_product_attention(q, k, v, attention_bias(jnp.asarray(mask), jnp.float32))
        return (out * g).sum(), out

    (_, out), grads = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    qt, kt, vt = (torch.from_numpy(a).transpose(1, 2).requires_grad_() for a in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=torch.from_numpy(mask).bool()[:, None, None, :])
    (ref * torch.from_numpy(g).transpose(1, 2)).sum().backward()
    np.testing.assert_allclose(np.asarray(out), ref.transpose(1, 2).detach().numpy(), atol=1e-6, rtol=1e-5)
    for ours_grad, ref_leaf in zip(grads, (qt, kt, vt)):
        np.testing.assert_allclose(np.asarray(ours_grad), ref_leaf.grad.transpose(1, 2).numpy(), atol=1e-6, rtol=1e-5)


def test_attention_dropout_is_dropout_on_the_softmax_probabilities():
    """The softmax is normalised after the second matmul; dropout must still act as on the probabilities."""
    q, k, v, g, mask = _attention_inputs(seed=1)
    key = jax.random.key(3)
    bias = attention_bias(jnp.asarray(mask), jnp.float32)

    def reference(q, k, v):
        return _softmax_attention(q, k, v, bias, lambda probs: dropout(probs, 0.25, key))

    def ours(q, k, v):
        return dot_product_attention(q, k, v, bias, dropout_rate=0.25, deterministic=False, rng=key)

    np.testing.assert_allclose(np.asarray(ours(q, k, v)), np.asarray(reference(q, k, v)), atol=1e-6, rtol=1e-5)
    assert not np.allclose(ours(q, k, v), dot_product_attention(q, k, v, bias), atol=1e-3)  # dropout acted
    for a, b in zip(jax.grad(lambda *x: (ours(*x) * g).sum(), (0, 1, 2))(q, k, v),
                    jax.grad(lambda *x: (reference(*x) * g).sum(), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_attention_fully_masked_rows_match_the_softmax_formula():
    """A row with every key masked (GPT-2's left padding) averages v, as softmax(scores) @ v does."""
    q, k, v, _, mask = _attention_inputs(seed=2)
    mask[0, :] = 0
    bias = attention_bias(jnp.asarray(mask), jnp.float32)
    reference = _softmax_attention(q, k, v, bias)
    out = dot_product_attention(q, k, v, bias)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out[0]), np.broadcast_to(v[0].mean(0), out[0].shape), atol=1e-6)


def test_attention_in_float16_does_not_overflow_before_normalising():
    """The unnormalised sum over 1024 keys of v = 100 is 102400 > float16's max; the output is 100."""
    q = jnp.zeros((1, 2, 1, 4), jnp.float16)
    v = jnp.full((1, 1024, 1, 4), 100.0, jnp.float16)
    out = dot_product_attention(q, jnp.zeros((1, 1024, 1, 4), jnp.float16), v)
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), 100.0)
