"""The periodic actions of the loop, each a small function of the session.

    train_step, eval_step = compile_steps(run)
    check_metric_names(run)                     # before the first step
    metrics = record_step(session, step, device_metrics, t0, timed)   # after each step
    val = evaluate_if_due(session, eval_step, state, step, window, on_evaluation)  # may stop the run
    save_if_due(session, step, state, val, stopping)
    summary = finish(session, eval_step, state, step)                 # test, export, summary

summary.json's times: `wall_time_s` is the training wall time over all sessions (to the last
step's checkpoint); `session` is the session that wrote the summary (its start, its wall time
from loading to export, the steps it trained), so re-running a finished run, which only tests
and exports it again, changes `session` and nothing the training measured.

Test hook: the environment variable `JAXTUNE_INJECT_NAN_STEP=N` turns the example weights of the
N-th train step's batch into NaN and makes that step's loss NaN (used by the tests; off when unset).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import lora
from jaxtune.checkpoint import CheckpointDamaged
from jaxtune.data.augment import Augment, with_augmentation
from jaxtune.errors import ConfigError, JaxtuneError
from jaxtune.models import save_pretrained
from jaxtune.run.build import Run
from jaxtune.run.folder import EXPORT, write_summary
from jaxtune.run.progress import after_evaluation, after_log_line, after_train_step, window_means
from jaxtune.run.session import Session, check_metric_names, checkpointed  # noqa: F401  (re-exported: the loop's check)
from jaxtune.retention import SPLIT as RETENTION, retention_summary
from jaxtune.runlog import fmt_metrics, read_metrics
from jaxtune.tasks.model_fns import (
    evaluate, make_batch_stats_eval_fn, make_batch_stats_loss_fn, make_eval_fn, make_loss_fn,
)
from jaxtune.train import make_eval_step, make_train_step

NAN_ENV = "JAXTUNE_INJECT_NAN_STEP"


# Called after each evaluation with (step, validation metrics); a non-empty string it returns
# stops the run there (cleanly: checkpoint, test, export) and is summary.json's `stopped`.
OnEvaluation = Callable[[int, dict], Optional[str]]


class NonFiniteLoss(JaxtuneError):
    """The loss became NaN or infinite; the run stopped before saving that step."""

    exit_code = 1


def nan_step() -> Optional[int]:
    v = os.environ.get(NAN_ENV)
    try:
        return int(v) if v else None
    except ValueError:
        raise ConfigError(f"{NAN_ENV}={v!r}: give a step number") from None


def _nan_when_weights_are(loss_fn):
    """The test hook's loss: NaN when the batch's weights are (tasks mask padding with
    `where`, which would turn NaN weights into a zero loss and only NaN gradients)."""

    def poisoned(params, batch, rng):
        loss, aux = loss_fn(params, batch, rng)
        return jnp.where(jnp.any(jnp.isnan(batch["weights"])), jnp.nan, loss), aux

    return poisoned


def device_augment(run: Run) -> Optional[Augment]:
    """`data.augment: {...}` (on the device, in the train step); None otherwise. Mixing needs one
    integer label per image."""
    augment = Augment.from_config(run.recipe.data.augment, run.task.num_labels)
    if augment is not None and run.task.modality != "image":
        raise ConfigError(f"data.augment: a mapping augments images on the device; task {run.task.name} "
                          "reads no images")
    if augment is not None and augment.mixes and run.data.problem_type not in (None, "single_label_classification"):
        raise ConfigError(f"data.augment: mixup / cutmix need single-label classification, not "
                          f"{run.data.problem_type}")
    return augment


def compile_steps(run: Run):
    """(train step, eval step), jitted on the plan's shardings (the state donated)."""
    poison = _nan_when_weights_are if nan_step() is not None else None
    augment = device_augment(run)
    if run.lora:  # the same pure steps; the frozen base is their model_state
        loss_fn = lora.make_loss_fn(run.model, run.task, wrap=poison)
        train = make_train_step(with_augmentation(loss_fn, augment, has_model_state=True), run.optimizer,
                                has_model_state=True)
        evaluate_fn = make_eval_step(lora.make_eval_fn(run.model, run.task), has_model_state=True)
    elif run.batch_stats:  # BatchNorm: the running statistics are the model_state the step updates
        loss_fn = make_batch_stats_loss_fn(run.model, run.task, wrap=poison,
                                           freeze_batchnorm=run.recipe.model.freeze_batchnorm)
        train = make_train_step(with_augmentation(loss_fn, augment, has_model_state=True), run.optimizer,
                                has_model_state=True)
        evaluate_fn = make_eval_step(make_batch_stats_eval_fn(run.model, run.task), has_model_state=True)
    else:
        loss_fn = make_loss_fn(run.model, run.task)
        train = make_train_step(with_augmentation(poison(loss_fn) if poison else loss_fn, augment), run.optimizer)
        evaluate_fn = make_eval_step(make_eval_fn(run.model, run.task))
    return run.plan.jit_train_step(train, run.abstract), run.plan.jit_eval_step(evaluate_fn, run.abstract)


def next_batch(s: Session, step: int):
    """The sharded batch of train step `step` (1-based), poisoned at the test hook's step."""
    batch = next(s.iterator)
    if nan_step() == step:
        batch = {**batch, "weights": batch["weights"] * np.float32("nan")}
    return s.run.plan.shard_batch(batch)


class Window:
    """Examples/s of the steps since the last log line or evaluation (not saved)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0, self.n = time.perf_counter(), 0

    def examples_per_s(self, batch_size: int) -> float:
        return self.n * batch_size / max(time.perf_counter() - self.t0, 1e-9)


def record_step(s: Session, step: int, device_metrics, t0: float, timed: bool, window: Window) -> dict:
    """Read a step's metrics (waits for it): stop on a non-finite loss, update the progress
    record, the bar and, every `train.log_every` steps, the log."""
    m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if not math.isfinite(m["loss"]):
        s.state = None
        s.ckpt.wait()
        last = s.ckpt.latest_step()
        where = f"step {last} in {s.ckpt.directory}" if last is not None else "none was written"
        raise NonFiniteLoss(f"non-finite loss ({m['loss']}) at step {step}; stopped without "
                            f"saving it (last good checkpoint: {where})")
    s.progress = after_train_step(s.progress, m, time.perf_counter() - t0 if timed else None)
    window.n += 1
    r = s.run
    ex_s = window.examples_per_s(r.recipe.train.batch_size)
    s.log.progress(step, m, ex_s)
    if step % r.recipe.train.log_every == 0 or step == r.total_steps:
        s.log.write(step, "train", window_means(s.progress, m), epoch=step / r.data.steps_per_epoch,
                    examples_per_s=ex_s, time=s.clock.elapsed)
        s.progress = after_log_line(s.progress)
        window.reset()
    return m


def evaluation_due(run: Run, step: int) -> bool:
    return run.has_validation and (step % run.eval_every == 0 or step == run.total_steps)


def run_eval(run: Run, eval_step, state, split: str) -> dict:
    batches = (run.plan.shard_batch(b) for b in run.data.eval_batches(split))
    return evaluate(eval_step, state, batches, run.task, split=f"{split} split")


def evaluate_if_due(s: Session, eval_step, state, step: int, window: Window,
                    on_evaluation: Optional[OnEvaluation] = None) -> Optional[dict]:
    """The validation metrics at an evaluation step (logged, best step and early stopping
    updated, then `on_evaluation` asked whether to stop), else None."""
    if not evaluation_due(s.run, step):
        return None
    val = run_eval(s.run, eval_step, state, "validation")
    s.log.write(step, "validation", val, epoch=step / s.run.data.steps_per_epoch)
    s.progress, notes = after_evaluation(s.progress, step, val, s.run.recipe.train)
    s.say(f"eval step {step}: {fmt_metrics(val)}{notes[0]}")
    for note in notes[1:]:
        s.say(note)
    log_retention(s, state, step)
    if on_evaluation is not None and s.progress.stopped is None:
        # e.g. a sweep's pruner: the reason becomes progress.stopped, so the loop ends after
        # this step's checkpoint, a resume does not train on, and summary.json says why
        reason = on_evaluation(step, val)
        if reason:
            s.progress = dataclasses.replace(s.progress, stopped=reason)
            s.say(f"stopped at step {step}: {reason}")
    window.reset()  # examples/s: training only
    return val


def log_retention(s: Session, state, step: int) -> Optional[dict]:
    """data.retention's measure of `state` (`jaxtune.retention`), logged as split 'retention'
    (TensorBoard: retention/<metric>); None without retention data."""
    r = getattr(s.run, "retention", None)  # a stand-in run (research loops, tests) may not have one
    if r is None:
        return None
    m = r.evaluate(state)
    s.log.write(step, RETENTION, m)
    s.say(f"retention step {step} ({r.measure}, {r.num_texts} texts): {fmt_metrics(m)}")
    return m


def checkpoint_due(run: Run, step: int) -> bool:
    """Steps whose state is saved whatever happens: evaluations, `checkpoint.every`, the end."""
    every = run.recipe.checkpoint.every
    return evaluation_due(run, step) or bool(every and step % every == 0) or step == run.total_steps


def save_if_due(s: Session, step: int, state, val: Optional[dict], stopping: bool) -> None:
    if checkpoint_due(s.run, step) or stopping or s.progress.stopped:
        # the training time so far: what summary.json reports once the run is complete
        s.progress = dataclasses.replace(s.progress, elapsed_s=s.clock.elapsed)
        s.ckpt.save(step, checkpointed(state, bool(s.run.batch_stats)), s.iterator, s.progress.to_json(), metrics=val)


def finish(s: Session, eval_step, state, step: int) -> dict:
    """After the loop: test the best checkpoint (else the last state), export it, write the
    summary and say the result."""
    r, p, d = s.run.recipe, s.progress, s.run.data
    best = p.best_step if (p.best_step is not None and r.checkpoint.keep_best > 0) else None
    if best is not None and best not in s.ckpt.steps():
        s.say(f"warning: the best checkpoint (step {best}) is gone; using step {step}")
        best = None
    model_step = best if best is not None else step
    if model_step != step:
        try:
            state = state.replace(params=s.ckpt.restore_params(model_step, s.run.abstract.params))
            if s.run.batch_stats:  # the best step's BatchNorm statistics belong with its params
                state = state.replace(model_state=s.ckpt.restore_model_state(model_step, s.run.abstract.model_state))
        except CheckpointDamaged as e:  # the run's own last state is still good: use it
            s.say(f"warning: {e}; moved it to {s.ckpt.move_aside(model_step)}; using step {step}")
            model_step, best = step, None
    test = None
    if "test" in d.splits:
        test = run_eval(s.run, eval_step, state, "test")
        s.log.write(step, "test", test, model_step=model_step)
    export = s.out / EXPORT
    save_pretrained(s.run.model, export, tokenizer=s.run.preprocessing, params=s.run.export_params(state),
                    batch_stats=state.model_state if s.run.batch_stats else None)
    summary = _summary(s, step, model_step, best, test, export)
    write_summary(s.out, summary)
    _say_result(s, summary, model_step, best, test)
    return summary


def _summary(s: Session, step: int, model_step: int, best: Optional[int], test, export) -> dict:
    r, p, d = s.run.recipe, s.progress, s.run.data
    examples_per_s = p.timed_steps * r.train.batch_size / p.train_s if p.train_s > 0 else None
    return {
        "name": r.name,
        "task": r.task,
        "model": r.model.path,
        "steps": step,
        "total_steps": s.run.total_steps,
        "stopped": p.stopped or "completed",
        "best_step": model_step,
        "metric": {"name": r.train.metric, "mode": r.train.metric_mode,  # of the model tested
                   "value": p.best_value if best is not None else (p.last_eval or {}).get(r.train.metric)},
        "validation": p.best_metrics if best is not None else p.last_eval,
        "last_validation": {"step": p.last_eval_step, **(p.last_eval or {})} if p.last_eval else None,
        "test": test,
        # training over all sessions, to the last step's checkpoint (compilation, evaluations and
        # saves included; loading, testing and export not): a re-evaluation leaves it as it was
        "wall_time_s": p.elapsed_s,
        "train_examples_per_s": examples_per_s,
        "resumed_from": s.resumed_from,
        "session": {  # the session that wrote this summary, from its start (loading) to now
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.started)),
            "wall_time_s": s.session_s(),
            "steps": step - s.start_step,  # 0: it only tested and exported a finished run
        },
        "export": str(export),
        "retention": (retention_summary(read_metrics(s.out), s.run.retention, model_step)
                      if s.run.retention is not None else None),
        "data": {
            "num_examples": d.num_examples,
            "steps_per_epoch": d.steps_per_epoch,
            "label_names": d.label_names,
            "dropped_rows": d.report.dropped,
            "files": d.report.to_json(),
        },
    }


def _say_result(s: Session, summary: dict, model_step: int, best: Optional[int], test) -> None:
    r, d = s.run.recipe, s.run.data
    by = f"best step {model_step} by validation {r.train.metric}" if best is not None else f"step {model_step}"
    if test is not None:
        words = []
        if "accuracy" in test:
            words.append(f"test accuracy {100 * test['accuracy']:.2f}%")
        if "macro_f1" in test:
            words.append(f"macro-F1 {test['macro_f1']:.4f}")
        others = fmt_metrics({k: v for k, v in test.items() if k not in ("accuracy", "macro_f1")})
        s.say(f"{' and '.join(words) or 'test'}{', ' + others if others else ''} "
              f"on {d.num_examples['test']} test examples ({by})")
    else:
        s.say(f"no test split; validation: {fmt_metrics(summary['validation'] or {})} ({by})")
    speed = f"{summary['train_examples_per_s']:.1f} train examples/s, " if summary["train_examples_per_s"] else ""
    steps, trained = summary["steps"], summary["session"]["steps"]
    what = f"trained {trained} of {steps} steps" if trained else f"tested the finished run of {steps} steps"
    s.say(f"done in {summary['session']['wall_time_s']:.1f}s: {what} ({speed}training took "
          f"{summary['wall_time_s']:.1f}s in all); exported to {summary['export']}")


__all__ = ["NAN_ENV", "NonFiniteLoss", "OnEvaluation", "Window", "check_metric_names", "checkpoint_due", "compile_steps",
           "evaluate_if_due", "finish", "log_retention", "next_batch", "record_step", "run_eval", "save_if_due"]
