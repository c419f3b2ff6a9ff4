"""What a sweep writes besides its trials' run folders: trials.csv, best.yaml, plots, a table.

Written after every trial by whichever process finished it (atomically: a file is written beside
its place and renamed), so the folder always describes the study as it stands.

trials.csv has one row per run folder: a trial resumed after its process stopped shows once, with
its final state and `attempts` > 1; trials handed back unrun (`surplus`) are not listed. The metric
column is the run's best validation value for complete trials and the last reported value for
pruned ones (Optuna's value of a pruned trial).
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path
from typing import Optional

import matplotlib.pyplot as plt  # Optuna's matplotlib plots draw on pyplot's figures
import optuna
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.visualization import matplotlib as plots
from optuna.trial import TrialState

from jaxtune.sweep.study import SURPLUS, run_number
from jaxtune.sweep.trial import RUN_DIR, STOPPED, WALL_S

TRIALS_CSV, BEST_YAML = "trials.csv", "best.yaml"
HISTORY_PNG, IMPORTANCE_PNG, PARALLEL_PNG, SLICE_PNG = "history.png", "importance.png", "parallel.png", "slice.png"
IMPORTANCE_MIN_TRIALS = 4  # parameter importance (fANOVA) from fewer complete trials says little


def rows(study: optuna.Study, keys: list[str], metric: str) -> list[dict]:
    trials = study.get_trials(deepcopy=False)
    replaced = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    out = []
    for t in trials:
        if t.user_attrs.get(SURPLUS) or t.number in replaced:
            continue
        wall = t.user_attrs.get(WALL_S)
        stopped = t.user_attrs.get(STOPPED)
        out.append({
            "trial": run_number(t),
            "state": t.state.name.lower(),
            **{k: t.params.get(k) for k in keys},
            metric: t.value,
            "wall_time_s": round(wall, 1) if isinstance(wall, (int, float)) else None,
            "attempts": len(t.system_attrs.get("retry_history", [])) + 1,
            "stopped": stopped if stopped not in (None, "completed", "pruned") else None,
            "run_dir": t.user_attrs.get(RUN_DIR),
        })
    return sorted(out, key=lambda r: r["trial"])


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_csv(folder: Path, table: list[dict]) -> Path:
    buf = io.StringIO()
    if table:
        w = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(table)
    write_atomic(folder / TRIALS_CSV, buf.getvalue())
    return folder / TRIALS_CSV


def best_trial(study: optuna.Study) -> Optional[optuna.trial.FrozenTrial]:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if done else None


def write_best(folder: Path, study: optuna.Study, metric: str) -> Optional[Path]:
    """best.yaml: the best complete trial's resolved recipe (its run's config.yaml) with its own
    name and a fresh output folder, runnable with `jaxtune run`."""
    best = best_trial(study)
    if best is None:
        return None
    run_dir = folder / best.user_attrs[RUN_DIR]
    recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
    recipe["name"] = f"{folder.name}-best"
    recipe["output_dir"] = None  # runs/<name>: not the trial's folder, which would only resume
    head = (f"# jaxtune run {folder / BEST_YAML}\n"
            f"# The best trial ({run_number(best)}, run folder {run_dir}) of the sweep in {folder}:\n"
            f"# validation {metric} {best.value:.6g} with "
            + ", ".join(f"{k}={v}" for k, v in best.params.items()) + "\n")
    write_atomic(folder / BEST_YAML, head + yaml.safe_dump(recipe, sort_keys=False))
    return folder / BEST_YAML


def write_plots(folder: Path, study: optuna.Study, keys: list[str], metric: str) -> list[Path]:
    """Optuna's matplotlib plots as PNGs; a plot that fails is a warning, never a failed sweep."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    plots = [(HISTORY_PNG, "plot_optimization_history")]
    if len(keys) > 1 and len(complete) >= IMPORTANCE_MIN_TRIALS:
        plots.append((IMPORTANCE_PNG, "plot_param_importances"))
    elif len(keys) > 1:
        plots.append((PARALLEL_PNG, "plot_parallel_coordinate"))
    else:
        plots.append((SLICE_PNG, "plot_slice"))
    written = []
    for name, fn in plots:
        try:
            _plot(folder / name, fn, study, metric)
            written.append(folder / name)
        except Exception as e:
            print(f"warning: could not draw {name}: {type(e).__name__}: {e}", flush=True)
    return written


def _plot(path: Path, fn: str, study: optuna.Study, metric: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        ax = getattr(plots, fn)(study, target_name=metric)
    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
    try:
        fig.set_size_inches(max(fig.get_size_inches()[0], 7), max(fig.get_size_inches()[1], 4.5))
        fig.tight_layout()
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        plt.close(fig)


def table_text(table: list[dict]) -> str:
    """trials.csv as aligned columns for the console."""
    if not table:
        return "(no trials)"

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cols = list(table[0])
    cells = [[cell(r[c]) for c in cols] for r in table]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_reports(folder: Path, study: optuna.Study, keys: list[str], metric: str) -> list[dict]:
    table = rows(study, keys, metric)
    write_csv(folder, table)
    write_best(folder, study, metric)
    write_plots(folder, study, keys, metric)
    return table


__all__ = ["BEST_YAML", "HISTORY_PNG", "IMPORTANCE_PNG", "PARALLEL_PNG", "SLICE_PNG", "TRIALS_CSV", "best_trial",
           "rows", "table_text", "write_best", "write_csv", "write_plots", "write_reports"]
