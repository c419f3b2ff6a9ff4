"""One trial of a sweep: an ordinary `jaxtune run` in `trials/NNNN/` with the trial's values.

The run's recipe is the sweep's recipe with the trial's values, `train.metric` / `metric_mode` set
to the sweep's metric (so the run keeps and tests its best checkpoint by what the sweep optimises)
and `output_dir` the trial's folder. After each evaluation the validation metric is reported to
Optuna and the pruner asked; a pruned run stops there through the loop's `on_evaluation` hook:
checkpoint, test, export, and `summary.json` says `"stopped": "pruned"`.

Outcomes: complete (the run's best validation metric), pruned (by the pruner, or a loss that
became non-finite: a diverged trial is a bad result, not a broken sweep), interrupted (SIGTERM /
SIGINT: the run saved a checkpoint; the trial goes back to the queue and a rerun resumes it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax
import optuna
from optuna.trial import TrialState

from jaxtune.config import replace
from jaxtune.errors import ConfigError, JaxtuneError
from jaxtune.run import NonFiniteLoss, run
from jaxtune.sweep.space import suggest
from jaxtune.sweep.study import Heartbeat, requeue, run_number

TRIALS = "trials"
# trial user attributes (besides the study module's): what trials.csv and best.yaml read
RUN_DIR, STOPPED, WALL_S = "run_dir", "stopped", "wall_time_s"


@dataclass
class Outcome:
    number: int  # the run folder's number
    state: str  # complete, pruned, interrupted
    value: Optional[float]
    params: dict


def run_dir_of(folder: Path, number: int) -> Path:
    return folder / TRIALS / f"{number:04d}"


def trial_recipe(base, params: dict, run_dir: Path, name: str, metric: str, mode: str):
    return replace(base, **params, output_dir=str(run_dir), name=name,
                   **{"train.metric": metric, "train.metric_mode": mode})


def run_trial(study: optuna.Study, trial: optuna.Trial, dims, base, folder: Path, metric: str, mode: str,
              space_file: str) -> Outcome:
    frozen = study.get_trials(deepcopy=False)[trial.number]
    number = run_number(frozen)
    out = run_dir_of(folder, number)
    params = suggest(trial, dims)
    if number == trial.number and out.exists() and any(out.iterdir()):
        study.tell(trial, state=TrialState.FAIL)
        raise JaxtuneError(f"{out} exists but the study has no earlier trial {number} that used it "
                           "(a study.db removed or replaced?); move the folder away or use another --output")
    try:
        recipe = trial_recipe(base, params, out, f"{folder.name}-{number:04d}", metric, mode)
    except ConfigError as e:
        study.tell(trial, state=TrialState.FAIL)
        raise ConfigError(f"{space_file}: trial {number}'s values {params} make an invalid recipe: "
                          f"{str(e).split(': ', 1)[-1]}") from None
    trial.set_user_attr(RUN_DIR, str(out.relative_to(folder)))
    resumed = "" if number == trial.number else f" (resuming trial {number} of a process that stopped)"
    print(f"\n=== trial {number}{resumed}: {fmt_params(params)} -> {out}", flush=True)
    beat = Heartbeat(trial)
    t0 = time.perf_counter()
    try:
        summary = run(recipe, on_evaluation=_pruning_hook(trial, metric, set(frozen.intermediate_values)))
    except NonFiniteLoss as e:
        trial.set_user_attr(STOPPED, "non-finite loss")
        trial.set_user_attr(WALL_S, time.perf_counter() - t0)
        study.tell(trial, state=TrialState.PRUNED)
        print(f"=== trial {number}: pruned ({e})", flush=True)
        return Outcome(number, "pruned", None, params)
    except JaxtuneError as e:  # a user mistake these values lead to (a batch the mesh cannot split)
        beat.stop()
        study.tell(trial, state=TrialState.FAIL)
        e.args = (f"trial {number} ({fmt_params(params)}): {e}",)
        raise
    except BaseException:  # a bug, Ctrl-C: fail it and requeue it (a rerun resumes its folder)
        beat.stop()
        requeue(study, trial.number)
        raise
    finally:
        beat.stop()
        jax.clear_caches()  # this trial's compiled steps: the next trial compiles its own
    if summary.get("stopped") == "signal":
        requeue(study, trial.number)
        return Outcome(number, "interrupted", None, params)
    trial.set_user_attr(WALL_S, summary.get("wall_time_s"))
    trial.set_user_attr(STOPPED, summary.get("stopped"))
    value = (summary.get("metric") or {}).get("value")
    if summary.get("stopped") == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        return Outcome(number, "pruned", value, params)
    if value is None or not math.isfinite(value):
        study.tell(trial, state=TrialState.FAIL)
        raise JaxtuneError(f"trial {number} ended without a validation {metric} ({out / 'summary.json'}); "
                           "a sweep needs a validation split (data.validation or data.validation_fraction)")
    study.tell(trial, value)
    return Outcome(number, "complete", value, params)


def _pruning_hook(trial: optuna.Trial, metric: str, reported: set):
    """The run loop's `on_evaluation`: report the metric at this step (unless a requeued trial
    inherited it: `reported`), stop if the pruner says so."""

    def on_evaluation(step: int, val: dict) -> Optional[str]:
        value = val.get(metric)
        if value is None or not math.isfinite(value):
            return None
        if step not in reported:
            trial.report(value, step)
        return "pruned" if trial.should_prune() else None

    return on_evaluation


def fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


__all__ = ["Outcome", "RUN_DIR", "STOPPED", "TRIALS", "WALL_S", "fmt_params", "run_dir_of", "run_trial",
           "trial_recipe"]
