"""The run folder, shared by `jaxtune run`, `eval`, `export` and `predict`.

    runs/<name>/
      config.yaml          the fully resolved recipe (what `jaxtune eval` rebuilds the data from)
      model_config.json    the model's HF config plus `jaxtune_task` (what `load` rebuilds it from)
      metrics.jsonl, tensorboard/, curves.png      written by `jaxtune.runlog`
      checkpoints/         Orbax steps (`jaxtune.checkpoint`)
      export/              an HF folder of the tested model
      summary.json         the final record

Only process 0 writes files; every process agrees on whether to resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import yaml
from jax.experimental import multihost_utils

from jaxtune.config import dump, to_dict
from jaxtune.errors import ConfigError, JaxtuneError
from jaxtune.parallel import is_main_process

CONFIG = "config.yaml"
MODEL_CONFIG = "model_config.json"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
EXPORT = "export"
# What a run that died before its first checkpoint leaves behind: safe to start over on.
_LEFT_BEFORE_FIRST_CHECKPOINT = {CONFIG, MODEL_CONFIG, "metrics.jsonl", "tensorboard", "curves.png",
                                 CHECKPOINTS}


def run_dir_of(recipe) -> Path:
    """`output_dir` as an absolute path (default `runs/<recipe name>`)."""
    out = recipe.output_dir or f"runs/{recipe.name or 'run'}"
    if "://" in out:
        raise ConfigError(
            f"output_dir {out}: jaxtune writes run files with ordinary file I/O; mount the bucket "
            "(e.g. gcsfuse) and give the mounted path"
        )
    return Path(out).expanduser().absolute()


def is_run_dir(path) -> bool:
    p = Path(path)
    return (p / CONFIG).is_file() and (p / MODEL_CONFIG).is_file()


def has_checkpoints(out: Path) -> bool:
    d = out / CHECKPOINTS
    return d.is_dir() and any(p.name.isdigit() and p.is_dir() for p in d.iterdir())


def prepare_run_dir(out: Path, restart: bool, say: Callable[[str], None]) -> bool:
    """Make `out` ready; returns whether to resume. Only process 0 moves anything.

    `restart` moves a used folder aside to `<out>.old-<time>` (nothing is ever deleted); a folder
    with results but no checkpoint is refused without it.
    """
    resume = has_checkpoints(out)
    if restart and out.exists() and any(out.iterdir()):
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        if is_main_process():
            out.rename(aside)
        say(f"--restart: moved the previous run to {aside}")
        resume = False
    elif not resume and out.exists():
        extra = sorted(p.name for p in out.iterdir() if p.name not in _LEFT_BEFORE_FIRST_CHECKPOINT)
        if extra:
            raise JaxtuneError(
                f"output_dir {out} holds {', '.join(extra)} but no checkpoint to resume from; "
                "pass --restart to move it aside and start over, or choose another output_dir"
            )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxtune-run-dir")
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    return resume


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(out: Path, recipe) -> list[str]:
    """`key old -> new` for each recipe key that differs from the run's config.yaml."""
    try:
        old = yaml.safe_load((out / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    a, b = _flat(old), _flat(to_dict(recipe))
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def write_run_config(out: Path, recipe, model_config: dict) -> None:
    """config.yaml and model_config.json (process 0)."""
    if is_main_process():
        (out / CONFIG).write_text(dump(recipe))
        (out / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2))


def read_model_config(run: Path) -> tuple[str, dict]:
    """(task, HF config dict) of a run folder's model."""
    hf_config = json.loads((Path(run) / MODEL_CONFIG).read_text())
    return hf_config.pop("jaxtune_task"), hf_config


def write_summary(out: Path, summary: dict) -> None:
    """summary.json, replaced atomically (process 0)."""
    if is_main_process():
        tmp = out / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        tmp.replace(out / SUMMARY)


__all__ = ["CHECKPOINTS", "CONFIG", "EXPORT", "MODEL_CONFIG", "SUMMARY", "config_changes", "has_checkpoints",
           "is_run_dir", "prepare_run_dir", "read_model_config", "run_dir_of", "write_run_config",
           "write_summary"]
