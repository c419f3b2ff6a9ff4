"""Elastic weight consolidation (Kirkpatrick et al. 2017) as one more transform of the chain.

EWC adds `strength / 2 * sum_i F_i (theta_i - theta0_i)^2` to the fine-tuning loss: a pull toward
the pretrained weights theta0, each weight held as hard as the pretraining objective depends on it,
measured by F, the diagonal of its Fisher information. Here:

- `ewc(strength, mask)`: the transform. Its state holds theta0 (a copy of the params given to
  `init`) and the Fisher (zeros until `with_fisher` fills it), so both are sharded, donated and
  checkpointed with the rest of the optimizer state; a resume restores them as they were. It adds
  the penalty's gradient `strength * F * (theta - theta0)` to the loss gradient, so it goes first
  in the chain (before clipping and the base optimizer, as the penalty's gradient would).
- `fisher_sums(log_prob_fn, params, frozen, batch, key)`: pure; the sum over the batch's examples
  of the squared gradient of log p(y | x) with y drawn from the model's own prediction (the true
  Fisher, by sampling; not the "empirical" Fisher of given labels), one example at a time (a scan:
  memory of one gradient, not a batch of them). `jaxtune.retention.Retention.log_prob_fn` gives
  the pretraining objective of each measure.
- `estimate_fisher(retention, state, samples, seed)`: the host loop, jitted on the run's mesh:
  `samples` draws over the retention texts (cycling with new draws when there are fewer texts),
  F = mean of the squared gradients, scaled so its mean over the penalised weights is 1 (so
  `strength` reads like an L2 coefficient: EWC with a constant Fisher is L2 toward theta0 with
  that coefficient).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.models.trees import flatten, path_str, unflatten
from jaxtune.transforms import like_by_path, path_table

PyTree = Any


class EWCState(NamedTuple):
    """theta0: the anchor (the params given to `init`); fisher: the diagonal Fisher, params-shaped."""

    theta0: PyTree
    fisher: PyTree


def ewc(strength: float, mask: Optional[Union[PyTree, Callable[[PyTree], PyTree]]] = None
        ) -> optax.GradientTransformation:
    """EWC's penalty gradient added to the updates: `g + strength * fisher * (params - theta0)`.

    Put it first in the chain (it is part of the loss gradient). The Fisher starts at zero (no
    pull) until `with_fisher` puts an estimate into the state.

    Args:
      strength: lambda, the penalty's weight.
      mask: optional pytree of bools (or function params -> such a tree); False leaves are passed
        through and hold no theta0 or Fisher.

    >>> import jax.numpy as jnp, optax
    >>> from jaxtune.ewc import ewc, with_fisher
    >>> theta0 = {'w': jnp.array([1.0, 2.0])}
    >>> tx = ewc(2.0)
    >>> state = with_fisher(tx.init(theta0), {'w': jnp.array([1.0, 0.5])})
    >>> u, _ = tx.update({'w': jnp.zeros(2)}, state, {'w': jnp.array([3.0, 0.0])})
    >>> u['w'].tolist()                                  # 2 * fisher * (params - theta0)
    [4.0, -2.0]
    """

    def init_fn(params):
        # A copy: params are donated to the train step, theta0 must own its buffers.
        return EWCState(theta0=jax.tree.map(jnp.copy, params), fisher=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("ewc needs params: call update(g, state, params)")
        updates = jax.tree.map(
            lambda g, p, p0, f: g + (strength * f * (p - p0)).astype(g.dtype),
            updates, params, state.theta0, state.fisher,
        )
        return updates, state

    tx = optax.GradientTransformation(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)


def with_fisher(opt_state, fisher: PyTree):
    """`opt_state` with every EWCState's Fisher taken from `fisher` (params-shaped), matched by
    path, so it works inside optax.masked / partition / MultiSteps (masked-out leaves stay
    MaskedNodes). Pure: jit it with the state donated."""
    table = path_table(fisher)

    def fill(node):
        if isinstance(node, EWCState):
            return node._replace(fisher=jax.tree.map(lambda old, new: jnp.asarray(new, old.dtype),
                                                     node.fisher, like_by_path(table, node.fisher)))
        return node

    return jax.tree.map(fill, opt_state, is_leaf=lambda x: isinstance(x, EWCState))


def fisher_of(opt_state) -> list:
    """The Fisher trees of the EWCStates in `opt_state` (for logs and tests)."""
    found = []
    jax.tree.map(lambda n: found.append(n.fisher) if isinstance(n, EWCState) else None, opt_state,
                 is_leaf=lambda x: isinstance(x, EWCState))
    return found


def fisher_sums(log_prob_fn: Callable, params, frozen, batch: dict, key) -> tuple[PyTree, jax.Array]:
    """(sum over the batch's examples of w * (d log p(y|x) / d params)^2, sum of w), w = the
    examples' `weights`. `log_prob_fn(params, frozen, example, key) -> scalar` takes one example
    with a leading axis of 1 and draws y itself from `key` (a key per example: fold_in(key, i)).
    Pure; jit it."""
    weights = jnp.asarray(batch["weights"], jnp.float32)
    grad = jax.grad(log_prob_fn)

    def one(total, xs):
        i, row = xs
        example = jax.tree.map(lambda x: x[None], row)
        g = grad(params, frozen, example, jax.random.fold_in(key, i))
        w = jnp.asarray(row["weights"], jnp.float32)
        return jax.tree.map(lambda t, gi: t + w * jnp.square(gi.astype(jnp.float32)), total, g), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    n = weights.shape[0]
    total, _ = jax.lax.scan(one, zeros, (jnp.arange(n), batch))
    return total, jnp.sum(weights)


def normalize(fisher: PyTree, mask: Optional[PyTree] = None) -> PyTree:
    """Fisher / its mean over the (masked-in) weights: mean 1 over what EWC penalises.

    >>> import jax.numpy as jnp
    >>> normalize({'a': jnp.array([1.0, 3.0]), 'b': jnp.array([8.0])}, {'a': True, 'b': False})['a'].tolist()
    [0.5, 1.5]
    """
    leaves = jax.tree.leaves(fisher)
    keep = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
    total = sum(jnp.sum(f) for f, k in zip(leaves, keep) if k)
    count = sum(f.size for f, k in zip(leaves, keep) if k)
    mean = total / max(count, 1)
    return jax.tree.map(lambda f: f / jnp.where(mean > 0, mean, 1.0), fisher)


# ---------------------------------------------------------------------------------------------
# A run's Fisher, before its first step


def penalised(run) -> dict:
    """{param path: bool}, params-shaped: what EWC pulls (trained, and in the checkpoint: a new head
    has no pretrained value to keep)."""
    fresh = {tuple(p) for p in run.fresh}
    plan = run.optimizer.plan
    return unflatten({p: (not plan[path_str(p)].frozen) and p not in fresh for p in flatten(run.params)})


def estimate_fisher(retention, state, *, samples: int, seed: int, mask: Optional[PyTree] = None) -> PyTree:
    """The diagonal Fisher of the retention measure's pretraining objective at `state.params`,
    from `samples` draws (examples of the retention texts in order, cycled with new draws), scaled
    to mean 1 over `mask`; float32, on the params' shardings. Jitted like the eval step."""
    param_sh = jax.tree.map(lambda x: x.sharding, state.params)
    frozen_sh = jax.tree.map(lambda x: x.sharding, retention.frozen)
    replicated = jax.sharding.NamedSharding(retention.plan.mesh, jax.sharding.PartitionSpec())
    fn = jax.jit(functools.partial(fisher_sums, retention.log_prob_fn),
                 in_shardings=(param_sh, frozen_sh, retention.plan.batch_sharding(), replicated),
                 out_shardings=(param_sh, replicated))
    root = jax.random.PRNGKey(seed)
    total, n, draw = None, 0.0, 0
    while n < samples:
        for batch in retention.host_batches():
            left = samples - n
            w = np.asarray(batch["weights"], np.float32)
            keep = np.cumsum(w > 0) <= left  # the first `left` real examples of this batch
            batch = {**batch, "weights": np.where(keep, w, 0.0).astype(np.float32)}
            sums, count = fn(state.params, retention.frozen, retention.plan.shard_batch(batch),
                             jax.random.fold_in(root, draw))
            draw += 1
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
            n += float(count)
            if n >= samples:
                break
    fisher = jax.tree.map(lambda t: t / n, total)
    return normalize(fisher, mask)


def install_fisher(state, fisher, state_shardings):
    """`state` with `fisher` in its optimizer state's EWCStates (jitted, the state donated)."""
    fill = jax.jit(lambda st, f: st.replace(opt_state=with_fisher(st.opt_state, f)), donate_argnums=(0,),
                   out_shardings=state_shardings)
    return fill(state, fisher)


def prepare(run, state):
    """A fresh run's state with its Fisher (`optim.ewc`): estimated on data.retention at the
    initial (pretrained) params, before the first step. Returns (state, note for the log)."""
    cfg = run.recipe.optim.ewc
    mask = penalised(run)
    fisher = estimate_fisher(run.retention, state, samples=cfg.samples, seed=run.recipe.train.seed, mask=mask)
    state = install_fisher(state, fisher, jax.tree.map(lambda x: x.sharding, state))
    held = [f for f, m in zip(jax.tree.leaves(fisher), jax.tree.leaves(mask)) if m]
    top = max(float(jnp.max(f)) for f in held) if held else 0.0
    return state, (f"EWC: diagonal Fisher of the {run.retention.measure} objective from {cfg.samples} samples "
                   f"of data.retention (mean 1 over the penalised weights, max {top:.3g}); strength {cfg.strength:g}")


__all__ = ["EWCState", "estimate_fisher", "ewc", "fisher_of", "fisher_sums", "install_fisher", "normalize",
           "penalised", "prepare", "with_fisher"]
