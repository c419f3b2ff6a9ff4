"""Tasks: everything task-specific (loss, eval sums, metrics, data kind, prediction), one file each.

    task = get_task("sequence-classification", model.config)
    task.data_kind, task.modality     # 'text' / 'tokens' / 'lm' / 'image'; 'text' or 'image'
    task.metric_names()               # what task.metrics() returns, known before any data is seen
    loss_fn = make_loss_fn(model)     # (params, batch, rng) -> (loss, aux), for make_train_step
    eval_fn = make_eval_fn(model)     # (params, batch) -> sums, for make_eval_step
    metrics = evaluate(jitted_eval_step, state, batches, task)   # over a whole split
    results = task.predict(loaded, ["a text", ...])                # `jaxtune predict`
    lines = [task.format(r) for r in results]

Batches are dicts of arrays: `input_ids`, `attention_mask`, optional `token_type_ids`, `labels`,
and `weights` (B,) float32, 0 for padding examples so they never count.

Adding a task: write `jaxtune/tasks/<task>.py` with a `Task` subclass and `make(config) -> Task`,
then add one line to `TASKS` below. Recipes, the data pipeline and `jaxtune predict` find it here.

This file stays light (no jax at import) so that `jaxtune.config` can validate recipe task names
against `TASKS`; the functions below load their modules on first use.
"""

from __future__ import annotations

import importlib

# task name -> module with make(config) -> Task: the one registry of tasks
TASKS = {
    "sequence-classification": "jaxtune.tasks.sequence_classification",
    "token-classification": "jaxtune.tasks.token_classification",
    "causal-lm": "jaxtune.tasks.causal_lm",
    "image-classification": "jaxtune.tasks.image_classification",
    "ctc": "jaxtune.tasks.ctc",
    "seq2seq-lm": "jaxtune.tasks.seq2seq_lm",
}

# public name -> module that defines it (loaded on first access: they import jax)
_LAZY = {
    "MODEL_INPUTS": "jaxtune.tasks.base",
    "Task": "jaxtune.tasks.base",
    "add_totals": "jaxtune.tasks.base",
    "model_inputs": "jaxtune.tasks.base",
    "evaluate": "jaxtune.tasks.model_fns",
    "make_eval_fn": "jaxtune.tasks.model_fns",
    "make_loss_fn": "jaxtune.tasks.model_fns",
    "task_of": "jaxtune.tasks.model_fns",
}


def task_module(name: str):
    """The module of task `name`; a one-line error naming the supported tasks otherwise."""
    if name not in TASKS:
        from jaxtune.errors import JaxtuneError

        raise JaxtuneError(f"task '{name}' has no loss yet; supported: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


def get_task(name: str, config=None):
    """The Task for `name`, shaped by a model config (num_labels, problem_type)."""
    return task_module(name).make(config)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxtune.tasks' has no attribute '{name}'")


__all__ = ["TASKS", "get_task", "task_module", *_LAZY]
