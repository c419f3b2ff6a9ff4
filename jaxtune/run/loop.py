"""`jaxtune run`: open a session, then a loop of train steps and periodic actions.

    from jaxtune.config import load_recipe
    from jaxtune.run import run
    summary = run(load_recipe("quickstart", ["train.steps=20"]))

Per step: a log line every `train.log_every` steps; an evaluation on the whole validation split
every `train.eval_every` steps (default: once per epoch) and at the end, which updates the best
step and early stopping; a checkpoint at every evaluation, every `checkpoint.every` steps, at
the end, on early stop and on SIGTERM / SIGINT (see `jaxtune.checkpoint` for what is kept).
After the loop the best checkpoint is tested and exported (`actions.finish`).

The host does not wait for the device between steps: step n+1 is dispatched before step n's
metrics are read, except at steps whose state an action needs (evaluation, checkpoint, stop) and
on several CPU devices, where XLA's CPU runtime can deadlock in a collective when multi-device
steps are queued (seen with jax 0.10.2). `JAXTUNE_OVERLAP_STEPS=0` turns it off everywhere. Dropout keys are `fold_in(state.rng, step)` and the data iterator is
saved at the checkpoint's step, so the result is the same either way, bit for bit.

Stopping: SIGTERM or SIGINT finishes the current step, saves a checkpoint and returns (exit 0).
The loop's handlers are installed first thing in `train`; before that (`open_session`: loading)
`jaxtune run`'s start-up handler stops at once with one line (`jaxtune.cli`).
A non-finite loss raises `NonFiniteLoss` naming the step (the CLI prints one line and exits 1);
that step's state is not saved, so the newest checkpoint is the last good one.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import jax

from jaxtune import parallel
from jaxtune.errors import ConfigError
from jaxtune.run.actions import (
    OnEvaluation, Window, check_metric_names, checkpoint_due, compile_steps, evaluate_if_due, finish, log_retention,
    next_batch, record_step, save_if_due,
)
from jaxtune.run.session import Session, open_session
from jaxtune.run.signals import StopSignal
from jaxtune.runlog import plot_curves

OVERLAP_ENV = "JAXTUNE_OVERLAP_STEPS"


def run(recipe, restart: bool = False, on_evaluation: Optional[OnEvaluation] = None) -> dict:
    """Train `recipe` (a validated `jaxtune.config.Recipe`); returns the summary dict.
    `on_evaluation(step, val)` may stop the run after an evaluation (`actions.OnEvaluation`)."""
    parallel.initialize()
    can_overlap_steps()  # a bad JAXTUNE_OVERLAP_STEPS fails before any work
    return train(open_session(recipe, restart=restart), on_evaluation)


def can_overlap_steps() -> bool:
    """Whether the loop may queue a step before reading the previous one's metrics: where it is
    safe (not several CPU devices), unless `JAXTUNE_OVERLAP_STEPS=0` turns it off."""
    setting = os.environ.get(OVERLAP_ENV, "1")
    if setting not in ("0", "1"):
        raise ConfigError(f"{OVERLAP_ENV}={setting!r}: use 0 (read every step before the next) or 1 (default)")
    return setting == "1" and not (jax.devices()[0].platform == "cpu" and jax.device_count() > 1)


def train(s: Session, on_evaluation: Optional[OnEvaluation] = None) -> dict:
    """The loop; returns the summary (or a stop record after a signal)."""
    stop = StopSignal(jax.process_count() > 1)  # from here a signal stops after a step and saves
    state, step, pending, stopped_by = s.state, s.start_step, None, None
    try:
        train_step, eval_step = compile_steps(s.run)
        check_metric_names(s.run)
        window, overlap = Window(), can_overlap_steps()
        if s.start_step == 0:  # the pretrained model's retention: the reference (a resume has it logged)
            log_retention(s, state, 0)
        while step < s.run.total_steps and s.progress.stopped is None:
            t0 = time.perf_counter()
            state, metrics = train_step(state, next_batch(s, step + 1))
            step += 1
            if pending is not None:  # the previous step's metrics, while the device runs this one
                record_step(s, *pending, window)
            pending = (step, metrics, t0, step > s.start_step + 1)  # a session's first step compiles
            stopping = stop.should_stop(step)
            if overlap and not (checkpoint_due(s.run, step) or stopping):
                continue
            record_step(s, *pending, window)
            pending = None
            val = evaluate_if_due(s, eval_step, state, step, window, on_evaluation)
            save_if_due(s, step, state, val, stopping)
            if stopping:
                stopped_by = stop.received
                break
        if pending is not None:
            record_step(s, *pending, window)
        s.state = state
        s.ckpt.wait()
        stop.close()  # from here a signal acts as usual: the checkpoint is safe
        if stopped_by:
            s.say(f"stopped by {stopped_by} at step {step}: saved a checkpoint in {s.ckpt.directory}; "
                  "run the same command again to resume")
            return {"stopped": "signal", "signal": stopped_by, "step": step}
        return finish(s, eval_step, state, step)
    finally:
        stop.close()
        _close(s)


def _close(s: Session) -> None:
    try:
        s.close()
    finally:
        if s.log.main:
            try:
                plot_curves(s.out, s.run.recipe.train.metric)
            except Exception as e:  # a plot must never fail a run
                print(f"warning: could not draw curves.png: {e}", flush=True)


__all__ = ["OVERLAP_ENV", "can_overlap_steps", "run", "train"]
