"""`jaxtune sweep`: hyperparameter search over a recipe with Optuna.

    from jaxtune.sweep import sweep
    sweep("quickstart", "space.yaml", ["train.steps=200"], trials=8, sampler="tpe", pruner="median")

The sweep folder (default `sweeps/<recipe name>`):

    study.db        the Optuna study (SQLite; --storage puts it elsewhere, see `study`)
    sweep.yaml      the storage given with --storage, so that a rerun without it finds the study
    trials/NNNN/    one ordinary run folder per trial (`jaxtune eval/export/predict` take it)
    trials.csv      one row per trial: state, values, metric, wall time, run folder
    best.yaml       the best trial's full recipe, runnable with `jaxtune run`
    history.png     Optuna's optimisation history; importance.png (parameter importance) with
                    several keys and enough trials, else parallel.png or, for one key, slice.png

Running the same command again continues the study: finished trials stay, an interrupted one
resumes from its run folder's checkpoint, and the study ends with exactly --trials complete or
pruned trials; several processes (or hosts) on one study share the work (`study.claim`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import optuna
import yaml

from jaxtune.config import load_recipe, to_dict
from jaxtune.errors import ConfigError, JaxtuneError
from jaxtune.sweep import report
from jaxtune.sweep.space import grid_size, read_space, space_json
from jaxtune.sweep.study import DONE, claim, folder_lock, open_storage, open_study
from jaxtune.sweep.trial import fmt_params, run_trial

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
SWEEP_YAML = "sweep.yaml"
DEFAULT_TRIALS = 10  # random / tpe; grid: every point of the grid


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, less its `study.stop()` once the grid is used up: that is for
    `study.optimize` (with ask/tell it raises), and the sweep counts its trials itself."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(kind: str, dims, n: int, seed: Optional[int]):
    if kind == "grid":
        return GridSampler({d.key: d.grid_values() for d in dims}, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE's random start: a third of a small sweep, at most Optuna's default 10; constant_liar
    # keeps processes that sample at the same time apart
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, n // 3)), constant_liar=True)


def make_pruner(kind: str, n: int):
    if kind == "median":
        # prune below the median of earlier trials at the same step once a few have finished
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, n // 4)), n_warmup_steps=0)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    return optuna.pruners.NopPruner()


def default_mode(metric: str, recipe) -> str:
    if metric == recipe.train.metric:
        return recipe.train.metric_mode
    return "min" if metric in ("loss", "perplexity", "mse", "mae") else "max"


def _storage_spec(folder: Path, given: Optional[str]) -> Optional[str]:
    """--storage, else the one sweep.yaml recorded; a different one than recorded is refused."""
    recorded = None
    if (folder / SWEEP_YAML).is_file():
        recorded = (yaml.safe_load((folder / SWEEP_YAML).read_text()) or {}).get("storage")
    if given is not None and recorded is not None and given != recorded:
        raise JaxtuneError(f"{folder} keeps its study in {recorded} ({folder / SWEEP_YAML}), not {given}; "
                           "give the same --storage or another --output")
    return given if given is not None else recorded


def _make_folder(folder: Path) -> None:
    try:
        (folder / "trials").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JaxtuneError(f"--output {folder}: cannot create it ({e.strerror or e})") from None


def sweep(recipe: str, space: str, overrides=(), trials: Optional[int] = None, sampler: str = "tpe",
          pruner: str = "median", metric: Optional[str] = None, mode: Optional[str] = None,
          output: Optional[str] = None, storage: Optional[str] = None, seed: Optional[int] = None) -> dict:
    """Run (or continue) a sweep; returns {"folder", "done", "trials", "best"}. See the module doc."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler}: choose one of {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner {pruner}: choose one of {', '.join(PRUNERS)}")
    if mode not in (None, "min", "max"):
        raise ConfigError(f"--mode {mode}: choose min or max")
    base = load_recipe(recipe, list(overrides))
    dims = read_space(space, base, sampler)
    metric = metric or base.train.metric
    mode = mode or default_mode(metric, base)
    n = _trial_count(trials, sampler, dims, space)
    folder = Path(output or f"sweeps/{base.name}").expanduser().absolute()
    spec = _storage_spec(folder, storage)
    _make_folder(folder)
    optuna.logging.set_verbosity(logging.WARNING)  # jaxtune says what happens, once
    identity = {"recipe": {k: v for k, v in to_dict(base).items() if k not in ("output_dir", "name")},
                "space": space_json(dims), "metric": metric, "mode": mode}
    with folder_lock(folder):
        store, where = open_storage(folder, spec)
        study = open_study(store, folder.name, identity, "maximize" if mode == "max" else "minimize", None, None)
        if spec is not None and not (folder / SWEEP_YAML).is_file():
            report.write_atomic(folder / SWEEP_YAML, yaml.safe_dump({"storage": spec}))
    started = len(study.get_trials(deepcopy=False))
    # a rerun with --seed must not replay the first run's samples: offset by the trials so far
    study.sampler = make_sampler(sampler, dims, n, None if seed is None else seed + started)
    study.pruner = make_pruner(pruner, n)
    keys = [d.key for d in dims]
    done = sum(t.state in DONE for t in study.get_trials(deepcopy=False))
    print(f"sweep {folder}: {n} trials of {base.name} over {', '.join(keys)} ({sampler} sampler, {pruner} pruner), "
          f"validation {metric} ({mode}); study in {where}" + (f"; {done} done already" if done else ""), flush=True)
    stopped = None
    while True:
        trial = claim(study, n)
        if trial is None:
            break
        outcome = run_trial(study, trial, dims, base, folder, metric, mode, str(space))
        table = report.write_reports(folder, study, keys, metric)
        done = sum(r["state"] in ("complete", "pruned") for r in table)
        if outcome.state == "interrupted":
            stopped = "signal"
            print(f"=== trial {outcome.number} interrupted: its run saved a checkpoint; run the same "
                  "command again to resume the sweep", flush=True)
            break
        value = "" if outcome.value is None else f", validation {metric} {outcome.value:.4f}"
        print(f"=== trial {outcome.number}: {outcome.state}{value}; {done}/{n} done{_best_note(study, metric)}",
              flush=True)
    table = report.write_reports(folder, study, keys, metric)
    return _finish(folder, study, table, n, metric, stopped)


def _trial_count(trials: Optional[int], sampler: str, dims, space) -> int:
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be positive, got {trials}")
    if sampler != "grid":
        return trials or DEFAULT_TRIALS
    size = grid_size(dims)
    if trials is not None and trials > size:
        raise ConfigError(f"{space}: --trials {trials} is more than the grid's {size} points")
    return trials or size


def _best_note(study: optuna.Study, metric: str) -> str:
    best = report.best_trial(study)
    if best is None:
        return ""
    return f"; best: trial {report.run_number(best)}, {metric} {best.value:.4f}"


def _finish(folder: Path, study: optuna.Study, table: list[dict], n: int, metric: str, stopped) -> dict:
    done = sum(r["state"] in ("complete", "pruned") for r in table)
    running = [r["trial"] for r in table if r["state"] in ("running", "waiting")]
    print("\n" + report.table_text(table), flush=True)
    best = report.best_trial(study)
    if best is not None:
        print(f"best: trial {report.run_number(best)} ({fmt_params(best.params)}), validation {metric} "
              f"{best.value:.4f}; recipe {folder / report.BEST_YAML}", flush=True)
    if done < n and stopped is None:
        print(f"{done} of {n} trials done; trials {', '.join(map(str, running))} are running in other "
              "processes, which finish the study (if they stop, run this command again)", flush=True)
    elif stopped is None:
        print(f"sweep complete: {done} trials; {folder / report.TRIALS_CSV}", flush=True)
    return {"folder": str(folder), "done": done, "trials": table, "stopped": stopped,
            "best": None if best is None else {"trial": report.run_number(best), "value": best.value,
                                               "params": best.params}}


__all__ = ["PRUNERS", "SAMPLERS", "make_pruner", "make_sampler", "sweep"]
