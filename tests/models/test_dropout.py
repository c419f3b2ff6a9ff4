"""Dropout's cheap random numbers: right rate, exact expectation, seeded, shape- and mesh-proof."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune.models.dropout import _uniform_u16, dropout


@pytest.mark.parametrize("shape", [(64, 128, 384), (3, 5, 7), (1,), (), (2, 3)])
def test_uniform_u16_is_uniform_and_seeded(shape):
    u = np.asarray(_uniform_u16(jax.random.key(0), shape))
    assert u.shape == shape and u.dtype == np.uint32
    assert (u < 65536).all()
    np.testing.assert_array_equal(u, np.asarray(_uniform_u16(jax.random.key(0), shape)))
    if u.size > 100_000:
        assert abs(u.mean() / 65535 - 0.5) < 0.002
        counts = np.bincount(u.ravel() >> 12, minlength=16) / u.size  # 16 equal bins
        np.testing.assert_allclose(counts, 1 / 16, atol=0.002)
        # neighbours (halves of one threefry word, the two words of one evaluation, the next
        # evaluation) are not correlated
        flat = u.ravel().astype(np.float64)
        for lag in (1, 2, 3, 4):
            assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 0.01


def test_different_keys_and_raw_keys():
    a = _uniform_u16(jax.random.key(0), (1000,))
    b = _uniform_u16(jax.random.key(1), (1000,))
    assert (np.asarray(a) != np.asarray(b)).mean() > 0.99
    raw = _uniform_u16(jax.random.PRNGKey(0), (1000,))  # legacy uint32[2] keys give the same
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(a))
    rbg = _uniform_u16(jax.random.key(0, impl="rbg"), (1000,))  # other impls still work
    assert np.asarray(rbg).max() < 65536


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.03])
def test_dropout_rate_and_expectation(rate):
    x = jnp.ones((256, 1024))
    y = np.asarray(dropout(x, rate, jax.random.key(3)))
    dropped = (y == 0).mean()
    assert abs(dropped - rate) < 0.005
    assert abs(y.mean() - 1.0) < 0.01  # kept values are scaled by 1 / (1 - rate)
    np.testing.assert_allclose(y[y != 0], 65536 / (65536 - round(rate * 65536)), rtol=1e-6)


def test_dropout_is_the_same_on_a_sharded_array():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.arange(16 * 32 * 8, dtype=jnp.float32).reshape(16, 32, 8) + 1
    one = np.asarray(jax.jit(lambda v: dropout(v, 0.25, jax.random.key(5)))(x))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("x")))
    many = jax.jit(lambda v: dropout(v, 0.25, jax.random.key(5)))(xs)
    np.testing.assert_array_equal(np.asarray(many), one)


@pytest.mark.parametrize("key", [jax.random.key(2), jax.random.PRNGKey(2), jax.random.key(2, impl="rbg")],
                         ids=["threefry", "raw", "rbg"])
def test_within_gives_the_corner_of_the_larger_draw(key):
    full = np.asarray(_uniform_u16(key, (3, 4, 5, 10)))
    np.testing.assert_array_equal(np.asarray(_uniform_u16(key, (3, 4, 1, 10), within=(3, 4, 5, 10))),
                                  full[:, :, :1])
    np.testing.assert_array_equal(np.asarray(_uniform_u16(key, (2, 4, 3, 10), within=(3, 4, 5, 10))),
                                  full[:2, :, :3])
    x = jnp.ones((3, 7, 6))
    np.testing.assert_array_equal(np.asarray(dropout(x[:, :1], 0.3, key, within=x.shape)),
                                  np.asarray(dropout(x, 0.3, key))[:, :1])


@pytest.mark.parametrize("shape,within", [((3, 1, 8), (3, 5, 9)), ((3, 6, 8), (3, 5, 8)), ((3, 8), (3, 1, 8))])
def test_within_must_hold_the_shape(shape, within):
    with pytest.raises(ValueError, match=r"not a leading corner of \(3, "):
        _uniform_u16(jax.random.key(0), shape, within=within)
