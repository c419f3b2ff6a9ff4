"""The dense layers' hand-written backward: the gradients of transformers (PyTorch) and of XLA's
own autodiff, and forward mode under `plain_autodiff()`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import export_tensors, from_pretrained, merge, plain_autodiff, split
from jaxtune.models.kernels.cpu import dense_dot_general


def _loss_and_grads(model, batch, labels):
    graphdef, params, rest = split(model)

    def loss(p):
        logits = merge(graphdef, p, rest)(**batch).logits
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_gradients_match_transformers(tiny, batch_for, arch):
    import torch

    t = tiny(arch, "sequence-classification", num_labels=3)
    batch = batch_for(t.model.config)
    labels = np.array([0, 2, 1])
    model = from_pretrained(t.path, task="sequence-classification")
    loss, grads = _loss_and_grads(model, {k: jnp.asarray(v) for k, v in batch.items()},
                                  jnp.asarray(labels))

    t.model.zero_grad()
    out = t.model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    ref = torch.nn.functional.cross_entropy(out.logits, torch.from_numpy(labels))
    ref.backward()
    assert abs(float(loss) - ref.item()) < 1e-5

    ours = export_tensors(model, grads)
    theirs = {k: p.grad.numpy() for k, p in t.model.named_parameters() if p.grad is not None}
    shared = sorted(set(ours) & set(theirs))
    assert len(shared) == len(theirs) >= 30  # every PyTorch gradient, kernels of all dense layers

    for key in shared:
        scale = max(1.0, float(np.abs(theirs[key]).max()))
        np.testing.assert_allclose(ours[key], theirs[key], atol=2e-5 * scale, err_msg=key)


def test_same_gradients_as_xla_autodiff(tiny, batch_for):
    t = tiny("bert", "sequence-classification", num_labels=3)
    batch = {k: jnp.asarray(v) for k, v in batch_for(t.model.config).items()}
    labels = jnp.asarray([1, 0, 2])
    model = from_pretrained(t.path, task="sequence-classification")
    _, fast = _loss_and_grads(model, batch, labels)
    with plain_autodiff():
        _, plain = _loss_and_grads(model, batch, labels)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (2, 1, 3, 4)])
def test_dense_dot_general_any_leading_dims_and_bf16(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (4, 6))
    dims = (((len(shape) - 1,), (0,)), ((), ()))
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)):
        xs, ws = x.astype(dtype), w.astype(dtype)

        def f(dot):
            return lambda x_, w_: (jnp.sin(dot(x_, w_, dims)).astype(jnp.float32) ** 2).sum()

        fast = jax.grad(f(dense_dot_general), (0, 1))(xs, ws)
        plain = jax.grad(f(jax.lax.dot_general), (0, 1))(xs, ws)
        for a, b in zip(fast, plain):
            assert a.dtype == dtype and a.shape == b.shape
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       atol=tol, rtol=tol)


def test_forward_mode_needs_plain_autodiff(tiny, batch_for):
    t = tiny("bert", "base")
    batch = {k: jnp.asarray(v) for k, v in batch_for(t.model.config).items()}
    model = from_pretrained(t.path, task="base")
    graphdef, params, rest = split(model)

    def f(p):
        return merge(graphdef, p, rest)(**batch).last_hidden_state.sum()

    tangent = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f, (params,), (tangent,))
    with plain_autodiff():
        value, slope = jax.jvp(f, (params,), (tangent,))
        hvp = jax.jvp(jax.grad(f), (params,), (tangent,))[1]  # forward-over-reverse
    assert np.isfinite(float(slope)) and abs(float(value) - float(f(params))) < 1e-3
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(hvp))
