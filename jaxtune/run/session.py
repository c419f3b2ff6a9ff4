"""One session of a run: the folder prepared, the run built, its state created or restored.

    session = open_session(recipe, restart=False)   # prints what it is about to do
    session.state, session.iterator, session.progress, session.start_step

Resuming: a run whose folder holds checkpoints continues from the newest readable one and says
so; the TrainState, the data iterator and the progress record all come back, so the result is
bit-identical to an uninterrupted run (same machine, same recipe).

The folder is checked before any data or model is loaded (`folder.open_run_dir`); nothing is
written in it until the run is built and its state restored or created, and a start that fails
(an error, Ctrl-C, or SIGTERM raised as an exception by the CLI's start-up handler) takes back
what it did: folders it created are removed while empty, a `--restart` move is undone. A session
whose settings differ from the run's config.yaml first moves the old config.yaml and summary.json
to `history/<time>/`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from jaxtune import ewc
from jaxtune.checkpoint import Checkpoints
from jaxtune.config import replace
from jaxtune.errors import ConfigError, JaxtuneError
from jaxtune.models import flatten, path_str
from jaxtune.parallel import is_main_process
from jaxtune.run.build import Run, build
from jaxtune.run.folder import (
    CHECKPOINTS, CONFIG, RunDir, config_changes, keep_previous_records, open_run_dir, run_dir_of,
    write_run_config,
)
from jaxtune.run.progress import Progress
from jaxtune.runlog import RunLog, Stopwatch
from jaxtune.tasks.model_fns import task_of


@dataclass
class Session:
    run: Run
    out: Path
    ckpt: Checkpoints
    log: RunLog
    state: Any
    iterator: Any
    progress: Progress
    start_step: int
    resumed_from: Optional[int]
    clock: Stopwatch = dataclasses.field(default_factory=Stopwatch)  # training, over all sessions
    started: float = dataclasses.field(default_factory=time.time)  # this session's start (epoch s)
    opened: float = dataclasses.field(default_factory=time.perf_counter)  # the same, perf_counter

    def session_s(self) -> float:
        """Wall time of this session so far (loading included)."""
        return time.perf_counter() - self.opened

    def say(self, msg: str) -> None:
        self.log.say(msg)

    def close(self) -> None:
        try:
            self.ckpt.close()
        finally:
            self.log.close()


def model_config_dict(model) -> dict:
    """What save_pretrained writes as config.json, plus the jaxtune head's task."""
    config = model.config.to_hf()
    config["architectures"] = [type(model).hf_architecture]
    config["jaxtune_task"] = task_of(model)
    return config


def checkpointed(state, batch_stats: bool = False):
    """The part of a TrainState a checkpoint holds: all but `model_state` when that is what does
    not train (a LoRA run's frozen base, read from model.path again; `{}` otherwise); with
    `batch_stats` (a BatchNorm model's running statistics, which train) all of it."""
    return state if batch_stats else state.replace(model_state={})


def check_metric_names(run: Run) -> None:
    """Fail before training when train.metric or early_stopping.metric is not a metric."""
    if not run.has_validation:
        return
    names = run.task.metric_names()
    t = run.recipe.train
    wanted = [("train.metric", t.metric)]
    if t.early_stopping is not None:
        wanted.append(("train.early_stopping.metric", t.early_stopping.metric))
    for key, name in wanted:
        if name not in names:
            raise ConfigError(f"{key}: '{name}' is not a validation metric of this task; "
                              f"choose one of {', '.join(names)}")


def open_session(recipe, restart: bool = False) -> Session:
    """Check and prepare the folder, build the run, restore or create its state; say what will
    happen. On any failure (or interruption) before it returns, undo what it did to the folder."""
    started, opened = time.time(), time.perf_counter()
    main = is_main_process()
    out = run_dir_of(recipe)
    recipe = replace(recipe, output_dir=str(out))
    notes: list[str] = []
    folder = open_run_dir(out, restart, notes.append)
    try:
        changed = config_changes(out, recipe) if main and folder.resume else []
        if changed:
            notes.append("note: the recipe differs from the run's config.yaml: " + "; ".join(changed))
        for note in notes if main else ():
            print(note, flush=True)
        session = _open(recipe, folder, bool(changed), time.strftime("%Y%m%d-%H%M%S", time.localtime(started)))
    except BaseException:
        for line in folder.undo():
            print(line, flush=True)
        raise
    session.started, session.opened = started, opened
    return session


def _checkpoints(out: Path, recipe) -> Checkpoints:
    return Checkpoints(out / CHECKPOINTS, recipe.checkpoint, metric=recipe.train.metric,
                       mode=recipe.train.metric_mode)


def _open(recipe, folder: RunDir, changed: bool, stamp: str) -> Session:
    out, resume, main = folder.path, folder.resume, is_main_process()
    run = build(recipe)
    check_metric_names(run)
    ckpt, ewc_note = None, None
    try:
        if resume:
            ckpt = _checkpoints(out, recipe)
            restored = ckpt.restore_latest(checkpointed(run.abstract, bool(run.batch_stats)), run.data.train_iterator)
            if restored is None:
                raise JaxtuneError(f"no checkpoint in {out / CHECKPOINTS} can be restored; "
                                   "pass --restart to start over")
            state, iterator = restored.state, restored.iterator
            if not run.batch_stats:  # the statistics came back with the state
                state = state.replace(model_state=run.frozen)
            progress, start = Progress.from_json(restored.meta), restored.step
        else:
            restored = None
            state = run.plan.create_state(run.params, run.optimizer, param_shardings=run.param_shardings,
                                          rng=recipe.train.seed, model_state=run.batch_stats or None)
            # the frozen base joins as it is (already on its shardings): through the jit it would be copied
            if not run.batch_stats:  # BatchNorm statistics went through the jit: placed replicated
                state = state.replace(model_state=run.frozen)
            iterator, progress, start = run.data.train_iterator(), Progress(), 0
            if recipe.optim.ewc is not None:  # the Fisher at the pretrained params, before the first step
                state, ewc_note = ewc.prepare(run, state)
            ckpt = _checkpoints(out, recipe)  # creates checkpoints/: not before the state exists
    except BaseException:
        if ckpt is not None:
            ckpt.close()
        raise
    # only now: a checkpoint that does not fit must not lose the old records
    kept = keep_previous_records(out, stamp) if changed else None
    write_run_config(out, recipe, model_config_dict(run.model))
    if kept is not None:
        print(f"kept the run's previous {CONFIG}" + (" and summary.json" if (kept / "summary.json").exists() else "")
              + f" in {kept}", flush=True)
    log = RunLog(out, main=main, resume_step=start if restored else None, total_steps=run.total_steps,
                 log_every=recipe.train.log_every)
    session = Session(run, out, ckpt, log, state, iterator, progress, start,
                      restored.step if restored is not None else None, Stopwatch(progress.elapsed_s))
    for line in describe(session):
        session.say(line)
    if ewc_note:
        session.say(ewc_note)
    return session


def describe(s: Session) -> list[str]:
    """What the session is about to do, as console lines."""
    r, d = s.run, s.run.data
    recipe = r.recipe
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(r.params))
    # by flattened path: a QLoRA base's QTensor counts its logical shape, not its codes + scales
    n_params = n_train + sum(int(np.prod(x.shape)) for x in flatten(r.frozen).values())
    fresh = ", ".join(path_str(p) for p in r.fresh[:4]) if recipe.model.path else "all (from config)"
    mesh = " x ".join(f"{k}={v}" for k, v in r.plan.mesh.shape.items())
    lines = [
        d.summary(),
        f"model: {type(r.model).__name__} from {recipe.model.path or 'model.config'}, "
        f"{n_params / 1e6:.2f}M params" + (f", new: {fresh}" if fresh else "")
        + (f"; LoRA rank {r.lora.rank} on {len(r.lora.targets)} kernels"
           + (f" (frozen matrices stored {r.lora.base_dtype})" if r.lora.base_dtype else "") + f", {n_train / 1e6:.3f}M trainable"
           if r.lora else ""),
        f"training {r.total_steps} steps ({r.total_steps / d.steps_per_epoch:.3g} epochs of "
        f"{d.steps_per_epoch}, batch {recipe.train.batch_size}) on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), mesh {mesh}; eval every {r.eval_every} steps; "
        f"output {s.out}",
    ]
    if s.resumed_from is not None:
        lines.append(f"resuming from step {s.resumed_from} (checkpoints in {s.out / CHECKPOINTS})")
        if s.resumed_from >= r.total_steps or s.progress.stopped:
            lines.append("the run is already complete; evaluating and exporting its best checkpoint again")
    if not r.has_validation:
        lines.append("note: no validation split: no evaluations during training; the last step is exported")
    return lines


__all__ = ["Session", "check_metric_names", "checkpointed", "describe", "model_config_dict", "open_session"]
