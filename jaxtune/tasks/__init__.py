"""Tasks: the loss, eval outputs and metrics of each kind of fine-tuning, one file per task.

    task = get_task("sequence-classification", model.config)
    loss_fn = make_loss_fn(model)          # (params, batch, rng) -> (loss, aux), for make_train_step
    eval_fn = make_eval_fn(model)          # (params, batch) -> sums, for make_eval_step
    metrics = evaluate(jitted_eval_step, state, batches, task)   # over a whole split

Batches are dicts of arrays: `input_ids`, `attention_mask`, optional `token_type_ids`, `labels`,
and `weights` (B,) float32, 0 for padding examples so they never count.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable, Optional

from jaxtune.errors import JaxtuneError
from jaxtune.tasks.base import MODEL_INPUTS, Task, add_totals, model_inputs

# task name -> module with make(config) -> Task
TASKS = {
    "sequence-classification": "jaxtune.tasks.sequence_classification",
    "token-classification": "jaxtune.tasks.token_classification",
    "causal-lm": "jaxtune.tasks.causal_lm",
    "image-classification": "jaxtune.tasks.image_classification",
}


def get_task(name: str, config=None) -> Task:
    """The Task for `name`, shaped by a model config (num_labels, problem_type)."""
    if name not in TASKS:
        raise JaxtuneError(f"task '{name}' has no loss yet; supported: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name]).make(config)


def task_of(model) -> str:
    """The task of a jaxtune head, from its HF architecture name."""
    from jaxtune.models import family_of

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
    from jaxtune.models import merge, split

    graphdef, _, rest = split(model)
    task = _resolve(model, task)

    def loss_fn(params, batch, rng):
        out = merge(graphdef, params, rest)(**model_inputs(batch), deterministic=False, rngs=rng)
        return task.loss(out.logits, batch)

    return loss_fn


def make_eval_fn(model, task: Optional[str | Task] = None) -> Callable:
    """`eval_fn(params, batch) -> dict of sums` (see `Task.outputs`), deterministic."""
    from jaxtune.models import merge, split

    graphdef, _, rest = split(model)
    task = _resolve(model, task)

    def eval_fn(params, batch):
        out = merge(graphdef, params, rest)(**model_inputs(batch), deterministic=True)
        return task.outputs(out.logits, batch)

    return eval_fn


def evaluate(eval_step: Callable, state, batches: Iterable, task: Task) -> dict:
    """Metrics over a whole split: sum `eval_step(state, batch)` over every batch, then
    `task.metrics`. Padding examples must carry weight 0; no batch is dropped."""
    totals = None
    for batch in batches:
        totals = add_totals(totals, eval_step(state, batch))
    if totals is None:
        raise JaxtuneError("evaluate: the split has no batches")
    return task.metrics(totals)


__all__ = [
    "MODEL_INPUTS",
    "TASKS",
    "Task",
    "add_totals",
    "evaluate",
    "get_task",
    "make_eval_fn",
    "make_loss_fn",
    "model_inputs",
    "task_of",
]
