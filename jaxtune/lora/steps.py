"""The loss and eval functions of a LoRA model, for the unchanged pure steps of `jaxtune.train`.

The trainable params (adapters + train_also) are the TrainState's `params`, the only thing
differentiated and the only thing the optimizer sees; the frozen base rides in `model_state`
(non-trainable state the step passes through unchanged: donated, so aliased, never copied):

    loss_fn = make_loss_fn(model)              # (params, frozen, batch, rng) -> (loss, (aux, frozen))
    step = make_train_step(loss_fn, tx, has_model_state=True)
    state = init_state(trainable, rng, frozen, tx=tx)
"""

from __future__ import annotations

from typing import Callable, Optional

from jaxtune.lora.apply import combine
from jaxtune.lora.layers import dropout_keys
from jaxtune.tasks.model_fns import make_eval_fn as _eval_fn
from jaxtune.tasks.model_fns import make_loss_fn as _loss_fn


def make_loss_fn(model, task=None, *, wrap: Optional[Callable] = None) -> Callable:
    """`loss_fn(trainable, frozen, batch, rng) -> (loss, (aux, frozen))` (has_model_state form).
    `wrap`: applied to the plain `(params, batch, rng)` loss first (e.g. a test hook)."""
    base = _loss_fn(model, task)
    if wrap is not None:
        base = wrap(base)

    def loss_fn(params, frozen, batch, rng):
        with dropout_keys(rng):
            loss, aux = base(combine(params, frozen), batch, rng)
        return loss, (aux, frozen)

    return loss_fn


def make_eval_fn(model, task=None) -> Callable:
    """`eval_fn(trainable, frozen, batch) -> dict of sums` (deterministic: no adapter dropout)."""
    base = _eval_fn(model, task)

    def eval_fn(params, frozen, batch):
        return base(combine(params, frozen), batch)

    return eval_fn


__all__ = ["make_eval_fn", "make_loss_fn"]
