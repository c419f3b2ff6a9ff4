"""The new optax transforms on small hand-made pytrees (exact numbers)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune.transforms import decay_toward_pretrained, gradual_unfreeze, scale_by_factors


def _leaves_of(state):
    return jax.tree.leaves(state)


def test_l2sp_pulls_toward_theta0_and_mask_holds_no_anchor():
    theta0 = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([4.0, 4.0])}
    tx = optax.chain(decay_toward_pretrained(0.25, mask={"w": True, "b": False}), optax.scale(-0.1))
    state = tx.init(theta0)
    # theta0 is stored for 'w' only, and as a copy (params get donated to the train step).
    anchors = _leaves_of(state)
    assert len(anchors) == 1 and anchors[0].shape == (2, 2)
    assert anchors[0] is not theta0["w"]
    assert anchors[0].unsafe_buffer_pointer() != theta0["w"].unsafe_buffer_pointer()

    delta = jnp.array([[2.0, 0.0], [-1.0, 4.0]])
    params = {"w": theta0["w"] + delta, "b": theta0["b"] + 7.0}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(zeros, state, params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.25 * delta, rtol=1e-6)
    assert np.all(np.asarray(updates["b"]) == 0.0)
    new = optax.apply_updates(params, updates)
    # The distance to theta0 shrinks by exactly (1 - lr * wd).
    np.testing.assert_allclose(new["w"] - theta0["w"], (1 - 0.025) * delta, rtol=1e-6)
    # The anchor does not follow the params.
    np.testing.assert_array_equal(_leaves_of(state)[0], theta0["w"])


def test_l2sp_needs_params():
    tx = decay_toward_pretrained(0.1)
    state = tx.init({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": jnp.ones(2)}, state)


def test_factors_per_slice_and_inside_partition():
    params = {"stack": {"kernel": jnp.ones((3, 2, 2))}, "head": jnp.ones(2), "frozen": jnp.ones(4)}
    factors = {"stack": {"kernel": np.array([0.25, 0.5, 1.0])}, "head": 2.0, "frozen": 1.0}
    # Inside optax.partition the frozen leaf becomes a MaskedNode: lookup by path still works.
    tx = optax.partition(
        {"train": scale_by_factors(factors), "frozen": optax.set_to_zero()},
        {"stack": {"kernel": "train"}, "head": "train", "frozen": "frozen"},
    )
    u, _ = tx.update(params, tx.init(params))
    np.testing.assert_array_equal(u["stack"]["kernel"][:, 0, 0], [0.25, 0.5, 1.0])
    np.testing.assert_array_equal(u["head"], [2.0, 2.0])
    np.testing.assert_array_equal(u["frozen"], np.zeros(4))


def test_factors_shape_mismatch_is_an_error():
    tx = scale_by_factors({"w": np.array([1.0, 2.0])})
    with pytest.raises(ValueError, match="does not fit"):
        tx.update({"w": jnp.ones((3, 2))}, tx.init(None))


def test_gradual_unfreeze_per_slice_compiles_once():
    traces = []
    tx = gradual_unfreeze({"stack": np.array([4, 2, 0]), "head": 0})

    @jax.jit
    def step(u, state):
        traces.append(1)  # runs only when jax traces (compiles) the function
        return tx.update(u, state)

    g = {"stack": jnp.ones((3, 5)), "head": jnp.ones(2)}
    state = tx.init(g)
    opened = []
    for _ in range(6):
        u, state = step(g, state)
        opened.append(np.asarray(u["stack"][:, 0]).tolist() + [float(u["head"][0])])
    assert opened == [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [0, 1, 1, 1],
        [0, 1, 1, 1],
        [1, 1, 1, 1],
        [1, 1, 1, 1],
    ]
    assert len(traces) == 1 and step._cache_size() == 1
    assert int(state.count) == 6


def test_theta0_is_sharded_like_the_params():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor"))
    params = {"kernel": jax.device_put(jnp.arange(64.0).reshape(8, 8), sharding)}
    tx = decay_toward_pretrained(0.1)
    for state in (tx.init(params), jax.jit(tx.init)(params)):
        assert state.theta0["kernel"].sharding.is_equivalent_to(sharding, 2)
        np.testing.assert_array_equal(state.theta0["kernel"], params["kernel"])
