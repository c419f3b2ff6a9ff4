"""The run folder, shared by `jaxtune run`, `eval`, `export` and `predict`.

    runs/<name>/
      config.yaml          the fully resolved recipe (what `jaxtune eval` rebuilds the data from)
      model_config.json    the model's HF config plus `jaxtune_task` (what `load` rebuilds it from)
      metrics.jsonl, tensorboard/, curves.png      written by `jaxtune.runlog`
      checkpoints/         Orbax steps (`jaxtune.checkpoint`)
      export/              an HF folder of the tested model
      summary.json         the final record
      history/<time>/      records a later session replaced: config.yaml (and summary.json) as
                           they were before a session with changed settings

Only process 0 writes files; every process agrees on whether to resume. `open_run_dir` checks
that the folder can be used before any data or model is loaded, and `RunDir.undo` takes back
what a failed start did to it (folders it created and left empty, a `--restart` move).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass, field
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
HISTORY = "history"
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


@dataclass
class RunDir:
    """The run folder as a session found and prepared it (see `open_run_dir`)."""

    path: Path
    resume: bool
    created: list = field(default_factory=list)  # folders this start made, outermost first
    aside: Optional[Path] = None  # where --restart moved the previous run

    def undo(self) -> list[str]:
        """After a failed start: remove the folders this start created while they are empty and
        move a --restart's previous run back. Never removes a file. Returns what to say."""
        if not is_main_process():
            return []
        said = []
        for d in reversed(self.created):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:  # something was written in it: leave it, and say so
                said.append(f"note: left {d}, which this start created: it is not empty")
                break
        if self.aside is not None and not self.path.exists():
            try:
                self.aside.rename(self.path)
                said.append(f"--restart: moved the previous run back to {self.path}")
            except OSError as e:
                said.append(f"note: the previous run stays in {self.aside} ({e.strerror})")
        return said


_PSEUDO = ("/proc", "/sys")  # kernel pseudo-filesystems: no place for files
_PROBE = ".jaxtune-probe-"  # written and removed to prove the folder takes files


def _unusable(out: Path, why: str) -> JaxtuneError:
    return JaxtuneError(f"output_dir {out}: {why}; choose another output_dir")


def check_run_dir(out: Path) -> None:
    """Fail with one line unless `out` is, or can become, a folder this process can write in.
    Creates nothing."""
    real = Path(os.path.realpath(out))
    for top in _PSEUDO:
        if real == Path(top) or Path(top) in real.parents:
            raise _unusable(out, f"{top} is a kernel pseudo-filesystem, not a place for files")
    p = out
    while not p.exists():
        if p.is_symlink():
            raise _unusable(out, f"{p} is a broken symbolic link")
        p = p.parent
    if not p.is_dir():
        raise _unusable(out, "it is a file, not a folder" if p == out else f"{p} is a file, not a folder")
    if p == out and not os.access(p, os.R_OK | os.W_OK | os.X_OK):
        raise _unusable(out, "no permission to write in it")
    if p != out and not os.access(p, os.W_OK | os.X_OK):
        raise _unusable(out, f"no permission to create folders in {p}")


def _make_dirs(out: Path) -> list[Path]:
    """mkdir -p that returns the folders it made (outermost first); a failure is one line."""
    missing = []
    p = out
    while not p.exists():
        missing.append(p)
        p = p.parent
    made = []
    try:
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        probe = out / f"{_PROBE}{os.getpid()}"
        probe.write_bytes(b"")  # os.access can be wrong (read-only mounts, ACLs, root)
        probe.unlink()
    except OSError as e:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
        reason = e.strerror or str(e)
        if e.errno == errno.ENOTDIR:
            reason = "a part of the path is a file, not a folder"
        raise _unusable(out, f"cannot write there ({reason})") from None
    return made


def open_run_dir(out: Path, restart: bool, say: Callable[[str], None]) -> RunDir:
    """Check and prepare `out` before any work: whether to resume, the folders made, a
    `--restart` move (process 0 changes the folder; every process agrees on `resume`).

    `restart` moves a used folder aside to `<out>.old-<time>` (nothing is ever deleted); a folder
    with results but no checkpoint is refused without it. Call `undo()` if the start fails.
    """
    main = is_main_process()
    if main:
        check_run_dir(out)
    resume = has_checkpoints(out)
    aside = None
    if restart and out.exists() and any(out.iterdir()):
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        if main:
            try:
                out.rename(aside)
            except OSError as e:
                raise _unusable(out, f"cannot move it aside to {aside} ({e.strerror})") from None
        say(f"--restart: moved the previous run to {aside}")
        resume = False
    elif not resume and out.exists():
        extra = sorted(p.name for p in out.iterdir()
                       if p.name not in _LEFT_BEFORE_FIRST_CHECKPOINT and not p.name.startswith(_PROBE))
        if extra:
            raise JaxtuneError(
                f"output_dir {out} holds {', '.join(extra)} but no checkpoint to resume from; "
                "pass --restart to move it aside and start over, or choose another output_dir"
            )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxtune-run-dir")
    made = []
    if main:
        try:
            made = _make_dirs(out)
        except JaxtuneError:
            RunDir(out, resume, [], aside).undo()
            raise
    return RunDir(out, resume, made, aside)


def prepare_run_dir(out: Path, restart: bool, say: Callable[[str], None]) -> bool:
    """`open_run_dir`, returning only whether to resume."""
    return open_run_dir(out, restart, say).resume


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(out: Path, recipe) -> list[str]:
    """`key old -> new` for each recipe key that differs from the run's config.yaml (not
    `output_dir`: a run folder that was moved or copied is the same run)."""
    try:
        old = yaml.safe_load((out / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    a, b = _flat(old), _flat(to_dict(recipe))
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k != "output_dir"]


def _history_dir(out: Path, stamp: str) -> Path:
    d = out / HISTORY / stamp
    n = 1
    while d.exists():
        n += 1
        d = out / HISTORY / f"{stamp}-{n}"
    return d


def keep_previous_records(out: Path, stamp: str) -> Optional[Path]:
    """Before a session with changed settings writes its config.yaml: move the run's config.yaml
    and summary.json (which describe the old settings) to `history/<stamp>/` (process 0).
    Returns that folder, or None when there was nothing to keep."""
    if not is_main_process() or not (out / CONFIG).is_file():
        return None
    d = _history_dir(out, stamp)
    d.mkdir(parents=True)
    for name in (CONFIG, SUMMARY):
        if (out / name).is_file():
            shutil.copy2(out / name, d / name)  # copied first: a crash in between loses nothing
    if (out / SUMMARY).is_file():
        (out / SUMMARY).unlink()  # it no longer describes the run's settings
    return d


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


__all__ = ["CHECKPOINTS", "CONFIG", "EXPORT", "HISTORY", "MODEL_CONFIG", "SUMMARY", "RunDir", "check_run_dir",
           "config_changes", "has_checkpoints", "is_run_dir", "keep_previous_records", "open_run_dir",
           "prepare_run_dir", "read_model_config", "run_dir_of", "write_run_config", "write_summary"]
