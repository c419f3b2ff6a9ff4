"""Optax transforms that fine-tuning needs and optax lacks.

- `decay_toward_pretrained`: L2-SP, decoupled weight decay that pulls each parameter toward its
  pretrained value theta0 (kept in the optimizer state) instead of toward zero.
- `scale_by_factors`: fixed per-parameter multipliers (layer-wise LR decay, `lr_multipliers`).
- `gradual_unfreeze`: per-parameter 0/1 gates that open at given update counts (ULMFiT), computed
  from a counter in the state so the compiled step never changes.

All have optax's shape: a factory returning `GradientTransformation(init, update)` with a
NamedTuple state. Per-parameter settings are pytrees shaped like the params whose leaves are a
scalar, or a 1-D array with one entry per slice along axis 0 for layers stacked on a leading axis
(scanned models). They are matched to updates BY PATH, so they keep working inside
`optax.partition` / `optax.masked` (which replace masked-out leaves with `optax.MaskedNode`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.models.trees import key_path

PyTree = Any


def path_table(tree: PyTree) -> dict[tuple, Any]:
    """{path tuple: leaf} of a pytree (leaves may be Python scalars, numpy or jax arrays)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {key_path(kp): leaf for kp, leaf in leaves}


def like_by_path(table: dict[tuple, Any], tree: PyTree) -> PyTree:
    """A tree shaped like `tree` whose leaves are `table[path]`; MaskedNodes stay MaskedNodes."""

    def get(kp, _):
        key = key_path(kp)
        if key not in table:
            raise KeyError(f"no per-parameter setting for {'/'.join(map(str, key))}")
        return table[key]

    return jax.tree_util.tree_map_with_path(get, tree)


def lookup(settings: PyTree) -> Callable[[PyTree], PyTree]:
    """`settings` (a params-shaped pytree) as a callable mask/label function matched by path."""
    table = path_table(settings)
    return lambda tree: like_by_path(table, tree)


def _per_slice(factor, u: jax.Array) -> jax.Array:
    """A scalar, or one value per slice along axis 0, shaped to broadcast against `u`."""
    f = np.asarray(factor)
    if f.ndim == 0:
        return jnp.asarray(f, u.dtype)
    if f.ndim != 1 or u.ndim == 0 or f.shape[0] != u.shape[0]:
        raise ValueError(f"per-slice setting of shape {f.shape} does not fit a leaf of shape {u.shape}")
    return jnp.asarray(f, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))


# ---------------------------------------------------------------------------------------------
# L2-SP: decay toward the pretrained weights


class DecayTowardPretrainedState(NamedTuple):
    """theta0: the anchor, a copy of the params given to `init` (sharded/checkpointed like them)."""

    theta0: PyTree


def decay_toward_pretrained(
    weight_decay: float,
    mask: Optional[Union[PyTree, Callable[[PyTree], PyTree]]] = None,
) -> optax.GradientTransformation:
    """L2-SP (Li et al. 2018) as decoupled weight decay: `updates + weight_decay * (params - theta0)`.

    Where `optax.add_decayed_weights` pulls weights toward zero, this pulls them toward theta0,
    the params passed to `init` (the pretrained weights when the optimizer is created right after
    loading), which is what fine-tuning wants: regularise toward what the model already knows.
    theta0 lives in the state, so it is sharded, donated and checkpointed with the rest of it.
    Place it after the base optimizer and before the learning rate, as `optax.adamw` does.

    Args:
      weight_decay: strength (multiplied by the learning rate downstream, as in AdamW).
      mask: optional pytree of bools (or function params -> such a tree); False leaves are
        passed through and hold no theta0.

    >>> import jax.numpy as jnp, optax
    >>> from jaxtune.transforms import decay_toward_pretrained
    >>> theta0 = {'w': jnp.array([1.0, 2.0]), 'b': jnp.array([5.0])}
    >>> tx = optax.chain(decay_toward_pretrained(0.5, mask={'w': True, 'b': False}),
    ...                  optax.scale(-0.1))                  # learning rate 0.1
    >>> state = tx.init(theta0)
    >>> params = {'w': jnp.array([3.0, 0.0]), 'b': jnp.array([7.0])}  # moved away from theta0
    >>> zero = {'w': jnp.zeros(2), 'b': jnp.zeros(1)}
    >>> updates, state = tx.update(zero, state, params)
    >>> [round(float(u), 6) for u in updates['w']]           # -0.1 * 0.5 * (params - theta0)
    [-0.1, 0.1]
    >>> bool(updates['b'][0] == 0)                          # masked: no decay
    True
    """

    def init_fn(params):
        # A copy: params are donated to the train step, theta0 must own its buffers.
        return DecayTowardPretrainedState(theta0=jax.tree.map(jnp.copy, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("decay_toward_pretrained needs params: call update(g, state, params)")
        updates = jax.tree.map(
            lambda g, p, p0: g + (weight_decay * (p - p0)).astype(g.dtype),
            updates,
            params,
            state.theta0,
        )
        return updates, state

    tx = optax.GradientTransformation(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)


# ---------------------------------------------------------------------------------------------
# Fixed per-parameter multipliers


def scale_by_factors(factors: PyTree) -> optax.GradientTransformation:
    """Multiply each update by its parameter's factor (layer-wise LR decay, per-group LR).

    `factors` is shaped like the params; a leaf is a number, or a 1-D array with one factor per
    slice along axis 0 (layers stacked for `scan`). Matched by path; stateless.

    >>> import jax.numpy as jnp
    >>> from jaxtune.transforms import scale_by_factors
    >>> tx = scale_by_factors({'head': 1.0, 'layers': jnp.array([0.25, 0.5])})
    >>> u, _ = tx.update({'head': jnp.ones(3), 'layers': jnp.ones((2, 3))}, tx.init(None))
    >>> u['layers'].tolist()
    [[0.25, 0.25, 0.25], [0.5, 0.5, 0.5]]
    """
    table = {k: np.asarray(v, np.float32) for k, v in path_table(factors).items()}

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        fs = like_by_path(table, updates)
        return jax.tree.map(lambda u, f: u * _per_slice(f, u), updates, fs), state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# Gradual unfreezing


class GradualUnfreezeState(NamedTuple):
    count: jax.Array  # updates seen so far (int32)


def gradual_unfreeze(start_steps: PyTree) -> optax.GradientTransformation:
    """Zero each update until the update count reaches its parameter's start step.

    `start_steps` is shaped like the params; a leaf is an int, or a 1-D int array with one start
    step per slice along axis 0 (stacked layers). The gate is computed from the count in the state
    inside the compiled update, so unfreezing a group never recompiles anything. Put it after the
    base optimizer: a waiting group's moments keep tracking its gradients, so it starts warm.

    >>> import jax.numpy as jnp
    >>> from jaxtune.transforms import gradual_unfreeze
    >>> tx = gradual_unfreeze({'head': 0, 'body': 2})
    >>> state = tx.init(None)
    >>> g = {'head': jnp.ones(1), 'body': jnp.ones(1)}
    >>> for step in range(3):
    ...     u, state = tx.update(g, state)
    ...     print(step, float(u['head'][0]), float(u['body'][0]))
    0 1.0 0.0
    1 1.0 0.0
    2 1.0 1.0
    """
    table = {k: np.asarray(v, np.int32) for k, v in path_table(start_steps).items()}

    def init_fn(params):
        del params
        return GradualUnfreezeState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        starts = like_by_path(table, updates)

        def gate(u, start):
            open_ = (state.count >= jnp.asarray(start)).astype(u.dtype)
            return u * _per_slice_traced(open_, u)

        updates = jax.tree.map(gate, updates, starts)
        return updates, GradualUnfreezeState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def _per_slice_traced(v: jax.Array, u: jax.Array) -> jax.Array:
    """Like `_per_slice` for a traced value: scalar, or one value per slice along axis 0."""
    if v.ndim == 0:
        return v
    if v.ndim != 1 or u.ndim == 0 or v.shape[0] != u.shape[0]:
        raise ValueError(f"per-slice setting of shape {v.shape} does not fit a leaf of shape {u.shape}")
    return v.reshape((-1,) + (1,) * (u.ndim - 1))
