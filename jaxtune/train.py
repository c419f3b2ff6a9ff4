"""Pure train and eval steps: `train_step(state, batch) -> (state, metrics)`.

Nothing here knows about jaxtune's models, meshes or recipes. Bring any loss:

    def loss_fn(params, batch, rng):          # -> (scalar loss, aux)
        ...
    train_step = make_train_step(loss_fn, optax.adamw(1e-3))
    state = init_state(params, jax.random.PRNGKey(0), tx=optax.adamw(1e-3))
    state, metrics = jax.jit(train_step, donate_argnums=0)(state, batch)

`jaxtune.parallel` jits the same functions with in/out shardings over a device mesh, and
`jaxtune.tasks.make_loss_fn(model)` builds `loss_fn` for a jaxtune model.

Metrics always hold `loss`, `grad_norm`, `param_norm` (after the update), `update_norm` and `lr`
(the learning rate of this update), plus the scalar entries of `aux` when it is a dict.
`lr` is `learning_rate(step)` when a schedule (or a jaxtune Optimizer) is given; otherwise the
`learning_rate` hyperparameter of an `optax.inject_hyperparams` optimizer; otherwise NaN, which
means "unknown" (a host loop must check only `loss` for finiteness).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Union

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a step changes, as one pytree (checkpointed as is).

    `step`: int32 scalar, the number of train steps taken. `params`: a pytree (jaxtune: a plain
    nested dict). `opt_state`: the optax state. `rng`: a PRNG key; step s draws its dropout key
    as `fold_in(rng, s)`, so a resumed run draws the same keys. `model_state`: non-trainable
    model variables (batch statistics, ...), `{}` for models without any.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    model_state: Any = flax.struct.field(default_factory=dict)


def init_state(params, rng, model_state=None, *, tx: optax.GradientTransformation) -> TrainState:
    """A fresh TrainState; jit it with out_shardings to create it sharded (`parallel.create_state`)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=rng,
        model_state={} if model_state is None else model_state,
    )


LearningRate = Union[None, float, Callable[[jax.Array], jax.Array]]


def unwrap_optimizer(optimizer) -> tuple[optax.GradientTransformation, LearningRate]:
    """(tx, learning_rate) of an optax transformation or a jaxtune Optimizer."""
    if hasattr(optimizer, "tx"):
        return optimizer.tx, getattr(optimizer, "learning_rate", None)
    if hasattr(optimizer, "init") and hasattr(optimizer, "update"):
        return optimizer, None
    raise TypeError(
        f"optimizer must be an optax GradientTransformation or a jaxtune Optimizer, "
        f"got {type(optimizer).__name__}"
    )


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every float leaf, accumulated in float32 (bf16-safe)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def current_lr(learning_rate: LearningRate, step, opt_state) -> jax.Array:
    """The learning rate of the update at train `step` (see the module docstring)."""
    if learning_rate is not None:
        if callable(learning_rate):
            return jnp.asarray(learning_rate(step), jnp.float32)
        return jnp.asarray(learning_rate, jnp.float32)
    # inject_hyperparams keeps hyperparams['learning_rate'] (and a schedule state of that name).
    for _, found in optax.tree_utils.tree_get_all_with_path(opt_state, "learning_rate"):
        if isinstance(found, jax.Array) and found.ndim == 0:
            return found.astype(jnp.float32)
    return jnp.asarray(jnp.nan, jnp.float32)


def _scalar_aux(aux) -> dict:
    if not isinstance(aux, dict):
        return {}
    return {k: v for k, v in aux.items() if isinstance(v, jax.Array) and v.ndim == 0}


def train_step(
    state: TrainState,
    batch: Any,
    *,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    learning_rate: LearningRate = None,
    has_model_state: bool = False,
) -> tuple[TrainState, dict]:
    """One optimizer update. Bind the keyword options with `make_train_step`, then jit."""
    rng = jax.random.fold_in(state.rng, state.step)
    if has_model_state:
        def grad_fn(params):
            loss, (aux, new_model_state) = loss_fn(params, state.model_state, batch, rng)
            return loss, (aux, new_model_state)

        (loss, (aux, model_state)), grads = jax.value_and_grad(grad_fn, has_aux=True)(state.params)
    else:
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        model_state = state.model_state
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        **_scalar_aux(aux),
        "loss": jnp.asarray(loss, jnp.float32),
        "grad_norm": global_norm(grads),
        "param_norm": global_norm(params),
        "update_norm": global_norm(updates),
        "lr": current_lr(learning_rate, state.step, opt_state),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
    )
    return new_state, metrics


def make_train_step(
    loss_fn: Callable,
    optimizer,
    *,
    learning_rate: LearningRate = None,
    has_model_state: bool = False,
) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`, pure; jit it at the call site.

    `loss_fn(params, batch, rng) -> (loss, aux)`; with `has_model_state=True`,
    `loss_fn(params, model_state, batch, rng) -> (loss, (aux, new_model_state))`.
    `optimizer`: any optax GradientTransformation or a jaxtune Optimizer (its schedule then
    feeds `lr`). `learning_rate`: a float or a schedule of the train step (with gradient
    accumulation, of the micro-step: jaxtune's Optimizer.learning_rate divides by k itself),
    for the `lr` metric only.
    """
    tx, schedule = unwrap_optimizer(optimizer)
    return functools.partial(
        train_step,
        loss_fn=loss_fn,
        tx=tx,
        learning_rate=learning_rate if learning_rate is not None else schedule,
        has_model_state=has_model_state,
    )


def eval_step(state, batch, *, eval_fn: Callable, has_model_state: bool = False):
    """`eval_fn` on the state's params (a bare params tree works too)."""
    params = state.params if isinstance(state, TrainState) else state
    if has_model_state:
        return eval_fn(params, state.model_state, batch)
    return eval_fn(params, batch)


def make_eval_step(eval_fn: Callable, *, has_model_state: bool = False) -> Callable:
    """`eval_step(state, batch) -> outputs`, pure; `eval_fn(params, batch) -> outputs`
    (`eval_fn(params, model_state, batch)` with `has_model_state=True`)."""
    return functools.partial(eval_step, eval_fn=eval_fn, has_model_state=has_model_state)


__all__ = [
    "TrainState",
    "current_lr",
    "eval_step",
    "global_norm",
    "init_state",
    "make_eval_step",
    "make_train_step",
    "train_step",
    "unwrap_optimizer",
]
