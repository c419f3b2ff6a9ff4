"""The adapted Linear without adapter dropout runs `x @ (W + scale * A @ B)` in one matmul with its
own backward (jaxtune.lora.layers.merged_dense): its loss and its gradients for the adapters, the
head and the input equal plain autodiff of the same function written as the merged model, under
both kernel sets; with adapter dropout the unmerged path is taken."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxtune import lora
from jaxtune.lora.layers import merged_dense
from jaxtune.models import flatten, from_pretrained, kernels, merge, split
from jaxtune.tasks import make_loss_fn


def test_merged_dense_values_and_gradients_equal_autodiff():
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(keys[0], (3, 5, 16))
    w = jax.random.normal(keys[1], (16, 24))
    a, b = jax.random.normal(keys[2], (16, 4)), jax.random.normal(keys[3], (4, 24))
    g = jax.random.normal(keys[4], (3, 5, 24))

    def ours(x, w, a, b):
        return (merged_dense(x, w, a, b, 0.5) * g).sum()

    def ref(x, w, a, b):
        return ((x @ w + (x @ a) @ b * 0.5) * g).sum()

    np.testing.assert_allclose(ours(x, w, a, b), ref(x, w, a, b), rtol=1e-5)
    got = jax.grad(ours, argnums=(0, 2, 3))(x, w, a, b)
    want = jax.grad(ref, argnums=(0, 2, 3))(x, w, a, b)
    for u, v in zip(got, want):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(jax.grad(ours, argnums=1)(x, w, a, b), 0)  # W is frozen: no gradient


@pytest.mark.parametrize("name", ["cpu", "xla"])
def test_a_lora_models_gradients_equal_the_merged_models(name, tiny, batch_for):
    path = tiny("bert", "sequence-classification").path
    model = from_pretrained(path, "sequence-classification")
    spec = lora.apply(model, rank=3, alpha=6.0)
    trainable, frozen = lora.partition(model)
    trainable = jax.tree.map(lambda v: v + 0.1, trainable)  # B != 0: the adapters matter
    batch = dict(batch_for(model.config), labels=np.array([0, 1, 1]), weights=np.ones(3, np.float32))
    rng = jax.random.PRNGKey(1)
    plain = from_pretrained(path, "sequence-classification")
    graphdef, _, rest = split(plain)
    plain_loss = make_loss_fn(merge(graphdef, split(plain)[1], rest))

    def reference(t):  # the same function: the merged kernels in a model without adapters
        return plain_loss(lora.merged_params(spec, lora.combine(t, frozen)), batch, rng)[0]

    with kernels.use(name):
        loss, grads = jax.value_and_grad(lambda t: lora.make_loss_fn(model)(t, frozen, batch, rng)[0])(trainable)
        ref_loss, ref_grads = jax.value_and_grad(reference)(trainable)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    ref_flat = flatten(ref_grads)
    for p, v in flatten(grads).items():
        np.testing.assert_allclose(v, ref_flat[p], rtol=1e-3, atol=1e-5, err_msg="/".join(map(str, p)))
