"""The pure train/eval steps with plain-jax losses, and the README's own-model example."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune.train import TrainState, init_state, make_eval_step, make_train_step

README = Path(__file__).parent.parent / "README.md"


def linear_loss(params, batch, rng):
    pred = batch["x"] @ params["w"] + params["b"]
    err = pred - batch["y"]
    return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err)), "per_example": err, "noise": jax.random.uniform(rng)}


@pytest.fixture
def data():
    rs = np.random.RandomState(0)
    x = rs.normal(size=(16, 3)).astype(np.float32)
    return {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3}


def fresh(tx, seed=0):
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    return init_state(params, jax.random.PRNGKey(seed), tx=tx)


def test_one_step_and_its_metrics(data):
    tx = optax.sgd(0.1)
    state = fresh(tx)
    step = jax.jit(make_train_step(linear_loss, tx))
    new, m = step(state, data)
    g = jax.grad(lambda p: linear_loss(p, data, jax.random.PRNGKey(0))[0])(state.params)
    gnorm = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(g)))
    np.testing.assert_allclose(new.params["w"], -0.1 * g["w"], rtol=1e-6)
    np.testing.assert_allclose(float(m["grad_norm"]), gnorm, rtol=1e-6)
    np.testing.assert_allclose(float(m["update_norm"]), 0.1 * gnorm, rtol=1e-6)
    pnorm = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(new.params)))
    np.testing.assert_allclose(float(m["param_norm"]), pnorm, rtol=1e-6)
    np.testing.assert_allclose(float(m["loss"]), float(jnp.mean(data["y"] ** 2)), rtol=1e-6)
    assert np.isnan(float(m["lr"]))  # plain optax without a schedule: unknown
    assert "mae" in m and "per_example" not in m  # scalar aux entries only
    assert int(new.step) == 1 and int(state.step) == 0


def test_pure_and_rng_per_step(data):
    tx = optax.sgd(0.1)
    state = fresh(tx, seed=3)
    step = jax.jit(make_train_step(linear_loss, tx))
    (a, ma), (b, mb) = step(state, data), step(state, data)
    assert float(ma["noise"]) == float(mb["noise"])
    np.testing.assert_array_equal(a.params["w"], b.params["w"])
    _, mc = step(a, data)
    assert float(mc["noise"]) != float(ma["noise"])
    want = jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(3), 1))
    assert float(mc["noise"]) == float(want)  # step s draws fold_in(rng, s): resumable


def test_lr_from_schedule_from_injected_hyperparams_and_from_optimizer(data):
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    tx = optax.sgd(schedule)
    step = jax.jit(make_train_step(linear_loss, tx, learning_rate=schedule))
    state = fresh(tx)
    lrs = []
    for _ in range(3):
        state, m = step(state, data)
        lrs.append(float(m["lr"]))
    np.testing.assert_allclose(lrs, [1.0, 0.9, 0.8], rtol=1e-6)

    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    step = jax.jit(make_train_step(linear_loss, tx))
    state = fresh(tx)
    lrs = []
    for _ in range(3):
        state, m = step(state, data)
        lrs.append(float(m["lr"]))
    np.testing.assert_allclose(lrs, [1.0, 0.9, 0.8], rtol=1e-6)

    class Optimizer(NamedTuple):  # the shape of jaxtune.optim's Optimizer
        tx: optax.GradientTransformation
        learning_rate: object
        accumulate: int

    # its learning_rate takes the train (micro-)step and divides by `accumulate` itself
    opt = Optimizer(optax.MultiSteps(optax.sgd(schedule), every_k_schedule=2),
                    lambda s: schedule(s // 2), 2)
    step = jax.jit(make_train_step(linear_loss, opt))
    state = fresh(opt.tx)
    lrs = []
    for _ in range(4):
        state, m = step(state, data)
        lrs.append(float(m["lr"]))
    np.testing.assert_allclose(lrs, [1.0, 1.0, 0.9, 0.9], rtol=1e-6)


def test_model_state_threads_through(data):
    """Non-trainable state (a running mean) is updated by the loss and carried in the state."""

    def loss_fn(params, model_state, batch, rng):
        mean = 0.5 * model_state["mean"] + 0.5 * jnp.mean(batch["x"], axis=0)
        loss, aux = linear_loss(params, batch, rng)
        return loss, (aux, {"mean": mean})

    tx = optax.sgd(0.1)
    state = init_state({"w": jnp.zeros(3), "b": jnp.zeros(())}, jax.random.PRNGKey(0),
                       {"mean": jnp.zeros(3)}, tx=tx)
    step = jax.jit(make_train_step(loss_fn, tx, has_model_state=True))
    state, _ = step(state, data)
    state, _ = step(state, data)
    np.testing.assert_allclose(state.model_state["mean"], 0.75 * data["x"].mean(0), rtol=1e-6)
    ev = jax.jit(make_eval_step(lambda p, ms, b: {"m": ms["mean"].sum()}, has_model_state=True))
    np.testing.assert_allclose(float(ev(state, data)["m"]), 0.75 * data["x"].mean(0).sum(), rtol=1e-5)


def test_eval_step_and_donation(data):
    tx = optax.adam(1e-1)
    state = fresh(tx)
    ev = jax.jit(make_eval_step(lambda p, b: {"loss": linear_loss(p, b, jax.random.PRNGKey(0))[0]}))
    before = float(ev(state, data)["loss"])
    step = jax.jit(make_train_step(linear_loss, tx), donate_argnums=0)
    old = state
    for _ in range(50):
        state, m = step(state, data)
    assert old.params["w"].is_deleted()  # the state was donated
    assert float(ev(state, data)["loss"]) < 0.5 * before
    assert float(ev(state.params, data)["loss"]) == float(ev(state, data)["loss"])
    assert isinstance(state, TrainState) and int(state.step) == 50


def test_optimizer_type_checked():
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        make_train_step(linear_loss, "adamw")


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    text = README.read_text()
    start = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block under {heading}"
    return match.group(1)


def test_readme_own_model_example_trains_on_a_mesh(capsys):
    code = readme_block("### Your own model and loss")
    assert "make_train_step" in code and "import jaxtune.models" not in code
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    state = scope["state"]
    out = capsys.readouterr().out
    assert re.search(r"step 200 loss \d", out)
    assert float(scope["metrics"]["loss"]) < 0.05
    # the hidden kernel is split over the tensor axis as its logical axes say; data over the batch
    assert state.params["hidden"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    assert len(state.params["hidden"]["kernel"].sharding.device_set) == 8
