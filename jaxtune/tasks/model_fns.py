"""A model and a task together: the loss and eval functions the pure steps take, and evaluation.

    loss_fn = make_loss_fn(model)          # (params, batch, rng) -> (loss, aux)
    eval_fn = make_eval_fn(model)          # (params, batch) -> dict of sums

A model with BatchNorm (`batch_stats(model)` non-empty) trains its running statistics in the
TrainState's `model_state` (`make_train_step(..., has_model_state=True)`):

    loss_fn = make_batch_stats_loss_fn(model)   # (params, stats, batch, rng) -> (loss, (aux, stats))
    eval_fn = make_batch_stats_eval_fn(model)   # (params, stats, batch) -> dict of sums
    metrics = evaluate(jitted_eval_step, state, batches, task)
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

from flax import nnx

from jaxtune.errors import JaxtuneError
from jaxtune.models import family_of, merge, split
from jaxtune.models.trees import batch_stats
from jaxtune.tasks import get_task
from jaxtune.tasks.base import Task, model_inputs


def task_of(model) -> str:
    """The task of a jaxtune head, from its HF architecture name."""
    task = family_of(model).task_of(getattr(type(model), "hf_architecture", ""))
    if task is None or task == "base":
        raise JaxtuneError(f"{type(model).__name__} is not a task head; pass task=...")
    return task


def _resolve(model, task) -> Task:
    if isinstance(task, Task):
        return task
    return get_task(task or task_of(model), model.config)


def make_loss_fn(model, task: Optional[str | Task] = None) -> Callable:
    """`loss_fn(params, batch, rng) -> (loss, aux)` for a jaxtune model (training mode: dropout
    on, driven by `rng`). The model's non-parameter state is held fixed."""
    graphdef, _, rest = split(model)
    task = _resolve(model, task)

    def loss_fn(params, batch, rng):
        out = merge(graphdef, params, rest)(**model_inputs(batch), deterministic=False, rngs=rng)
        return task.loss(out.logits, batch)

    return loss_fn


def make_eval_fn(model, task: Optional[str | Task] = None) -> Callable:
    """`eval_fn(params, batch) -> dict of sums` (see `Task.outputs`), deterministic."""
    graphdef, _, rest = split(model)
    task = _resolve(model, task)
    if hasattr(task, "eval_fn"):  # a task whose evaluation does more than one forward pass (seq2seq-lm generates)
        return task.eval_fn(graphdef, rest)

    def eval_fn(params, batch):
        out = merge(graphdef, params, rest)(**model_inputs(batch), deterministic=True)
        return task.outputs(out.logits, batch)

    return eval_fn


def make_batch_stats_loss_fn(model, task: Optional[str | Task] = None, *, freeze_batchnorm: bool = False,
                             wrap: Optional[Callable] = None) -> Callable:
    """`loss_fn(params, stats, batch, rng) -> (loss, (aux, new stats))` for a model with BatchNorm
    (the `has_model_state` form of `make_train_step`; `stats` = `batch_stats(model)`-shaped).

    Train mode normalises by the batch's statistics and returns the running ones updated (with
    the model's momentum); `freeze_batchnorm=True` normalises by the running statistics and
    returns them unchanged (eval-mode BatchNorm while the weights fine-tune). `wrap` is applied
    to the loss as a `(params, batch, rng) -> (loss, aux)` function first (a test hook)."""
    graphdef, _, _, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    task = _resolve(model, task)
    running = True if freeze_batchnorm else None

    def plain(params_and_stats, batch, rng):
        params, stats = params_and_stats
        m = nnx.merge(graphdef, params, stats, rest)
        out = m(**model_inputs(batch), deterministic=False, rngs=rng, use_running_average=running)
        loss, aux = task.loss(out.logits, batch)
        return loss, (aux, stats if freeze_batchnorm else batch_stats(m))

    # the hook sees (params and stats, batch, rng) and passes the (aux, stats) it gets through
    body = wrap(plain) if wrap is not None else plain

    def loss_fn(params, stats, batch, rng):
        return body((params, stats), batch, rng)

    return loss_fn


def make_batch_stats_eval_fn(model, task: Optional[str | Task] = None) -> Callable:
    """`eval_fn(params, stats, batch) -> dict of sums`, BatchNorm on the running statistics."""
    graphdef, _, _, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    task = _resolve(model, task)

    def eval_fn(params, stats, batch):
        out = nnx.merge(graphdef, params, stats, rest)(**model_inputs(batch), deterministic=True)
        return task.outputs(out.logits, batch)

    return eval_fn


class NonFiniteMetric(JaxtuneError):
    """An evaluation gave NaN or infinity: never reported as a result."""

    exit_code = 1


def evaluate(eval_step: Callable, state, batches: Iterable, task: Task, split: str = "split") -> dict:
    """Metrics over a whole split: sum `eval_step(state, batch)` over every batch, then
    `task.metrics`. Padding examples must carry weight 0; no batch is dropped. A non-finite
    metric raises NonFiniteMetric (naming `split`) instead of passing as a number."""
    totals = None
    for batch in batches:
        totals = task.accumulate(totals, eval_step(state, batch))
    if totals is None:
        raise JaxtuneError(f"evaluate: the {split} has no batches")
    metrics = task.metrics(totals)
    bad = [f"{k} {v}" for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteMetric(f"the {split}'s {', '.join(bad)}: not finite; no result written")
    return metrics


__all__ = ["NonFiniteMetric", "evaluate", "make_batch_stats_eval_fn", "make_batch_stats_loss_fn", "make_eval_fn",
           "make_loss_fn", "task_of"]
