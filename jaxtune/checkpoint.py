"""Checkpoints of a run: the TrainState, the data iterator and the loop's bookkeeping, together.

    ckpt = Checkpoints(run_dir / "checkpoints", recipe.checkpoint, metric="accuracy", mode="max")
    ckpt.save(step, state, iterator, meta, metrics=val_metrics)   # async; metrics at eval steps
    restored = ckpt.restore_latest(abstract_state, make_iterator) # newest readable one, or None
    params = ckpt.restore_params(step, abstract_params)           # params only (export, eval)
    ckpt.close()                                                  # waits for the last save

Each step folder holds three items saved as one Orbax `Composite`: `state` (the TrainState's
arrays, sharded, OCDBT), `data` (Grain's iterator state, one JSON per process) and `meta` (a
JSON dict: best step, early-stopping counters, log accumulators, elapsed time, ...).

What is kept: the newest `keep` checkpoints, plus the `keep_best` best by the eval metric
(Orbax `LatestN` + `BestN`, combined with `AnyPreservationPolicy`: a checkpoint stays if either
keeps it). Only eval steps carry metrics, so checkpoints saved between evals are kept only as
recent ones. On ties the earlier step is the better one (as the trainer's best-step tracking).

Why no work is lost: Orbax writes each step into a temporary folder and renames it when complete
(a crash leaves only a `*.orbax-checkpoint-tmp-*` folder, removed on the next start), and deletes
old steps only after the new one is finalized, in the same background thread (async saves
included). So once one checkpoint exists, some complete checkpoint always exists.

A checkpoint that cannot be read (truncated, corrupt) raises CheckpointDamaged; when resuming,
it is moved aside to `<checkpoints>.corrupt/` (never deleted) with a warning, and the next older
one is tried. A checkpoint that does not fit the recipe (other model or optimizer) is a user
error (CheckpointMismatch): nothing is moved. What counts as damage: any file that a restore
reads, cut short or corrupt: the array data and OCDBT manifest (TensorStore names the file), and
the JSON files, which are checked before Orbax reads them so that the error names the file
(`_CHECKPOINT_METADATA`, `metrics/metrics`, `meta/metadata`, `data/*.json`, `state/_METADATA`,
`state/array_metadatas/*`). A step whose metrics cannot be read cannot be ranked: it counts as
damaged, and `best_step()` says so rather than silently pick another. Files that no restore reads
(`commit_success.txt`, `state/_sharding`, the per-process `state/ocdbt.process_*/` files that the
finalized step's root OCDBT database no longer refers to) do not matter: the step restores the
same bits without them (tests/test_checkpoint_damage.py cuts every file of a step).

A failed restore leaves echoes of its parallel reads (asyncio log records, unraisable
callbacks, never-awaited coroutines) that Orbax lets reach stderr. `quiet_orbax()` drops exactly
those, and Orbax's expected warnings, for the whole process; importing this module changes no
process-wide state (loggers, warning filters, hooks), so only programs that call it are quieted.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp

from jaxtune.config import CheckpointConfig
from jaxtune.errors import JaxtuneError
from jaxtune.parallel import is_main_process

log = logging.getLogger("jaxtune")

# Substrings of Orbax's errors that mean "this checkpoint is fine, it just holds another tree".
_MISMATCH = ("tree structures do not match", "is not compatible with the stored shape")
# What Orbax raises for unreadable files: TensorStore's read errors (ValueError: "OUT_OF_RANGE:
# ...", "NOT_FOUND: ..."), torn JSON (JSONDecodeError), a missing item (KeyError), file errors.
_DAMAGE = (OSError, ValueError, KeyError)
# What a failed write raises: OSError (ENOSPC, EFBIG), TensorStore's ValueError ("OUT_OF_RANGE:
# Error writing ... Failed writing").
_WRITE_FAILURES = (OSError, ValueError)


# ---------------------------------------------------------------------------------------------
# Orbax's expected noise, quieted only when asked (quiet_orbax): importing this module changes
# no process-wide state.


class _QuietExpectedWarnings(logging.Filter):
    """Orbax warnings that are expected here: saves between evaluations carry no metrics by
    design, and `jaxtune eval/export` open checkpoints read-only on purpose; and Orbax's logs of
    what jaxtune reports itself in one line (a torn _CHECKPOINT_METADATA, a failed save)."""

    EXPECTED = ("did not provide metrics", "Given directory is read only", "read_only=True",
                # a torn _CHECKPOINT_METADATA, logged whole (ERROR, once per listing); a restore
                # of that step checks the file itself and reports it as damaged (one line)
                "Failed to json parse Metadata file")

    # A failed save (a full disk) is logged by each of Orbax's background threads with its
    # traceback (~250 lines), then raised again from the next wait for it, which `Checkpoints`
    # turns into one CheckpointNotSaved line.
    FAILED_SAVE = ("_SignalingThread.run() raised an exception",
                   "Handler Commit operations or the Commit callback in background save thread",
                   "Save Finalize thread (save_finalize) failed")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(m in message for m in self.EXPECTED + self.FAILED_SAVE)


class _QuietSiblingReadErrors(logging.Filter):
    """A failed restore reads its arrays in parallel asyncio tasks; Orbax awaits the first
    error, and the other tasks' errors about the same damaged files reach asyncio's '(Task|
    Future) exception was never retrieved' log, with a traceback, whenever they are garbage
    collected. The restore's own error or warning already reports the step, so drop exactly
    those records: errors that name the folder of a step that failed to restore (and was not
    saved again since). `Checkpoints` keeps `damaged` up to date whether or not the filter is
    installed."""

    def __init__(self):
        super().__init__()
        self.damaged: set[str] = set()
        self.mismatch_reported = False  # its siblings' shape errors name no folder

    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else None
        if e is None or "exception was never retrieved" not in str(record.msg).split("\n")[0]:
            return True
        # also a failed save's parallel writes into its temporary folder: save/wait/close raise
        # the save's own error (CheckpointNotSaved)
        return not (self.names_damaged(str(e)) or _TMP_FOLDER in str(e)
                    or (self.mismatch_reported and any(m in str(e) for m in _MISMATCH)))

    def names_damaged(self, text: str) -> bool:
        return any(d in text for d in self.damaged)


# Orbax's temporary folder of an unfinished save: `<step>.orbax-checkpoint-tmp[-<n>]`.
_TMP_FOLDER = ".orbax-checkpoint-tmp"


_expected_warnings = _QuietExpectedWarnings()
_sibling_read_errors = _QuietSiblingReadErrors()


def _drop_closed_loop_callbacks(previous: Callable) -> Callable:
    """An unraisable hook for two echoes of a failed restore's other reads: TensorStore still
    completes them and calls back into Orbax's (already closed) event loop ('Event loop is
    closed', one traceback per array); and a read coroutine abandoned mid-read, when garbage
    collected, turns its GeneratorExit into Orbax's 'Encountered error while reading array
    index' with TensorStore's whole spec (~60 lines per array): dropped when the spec names a
    step that failed to restore. Everything else goes to `previous`."""

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        if isinstance(e.__cause__, GeneratorExit) and _sibling_read_errors.names_damaged(str(e)):
            return
        previous(unraisable)

    hook._jaxtune = True
    return hook


# Where Orbax's read path defines the coroutines a failed restore leaves unawaited (all of them
# are imported with `orbax.checkpoint`).
_ORBAX_READ_MODULES = ("orbax.checkpoint._src.serialization.", "orbax.checkpoint._src.metadata.")


def _orbax_read_coroutines() -> list[str]:
    """Qualified names of the coroutine functions defined in Orbax's read path."""
    names = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith(_ORBAX_READ_MODULES) or module is None:
            continue
        for obj in list(vars(module).values()):
            for f in vars(obj).values() if inspect.isclass(obj) else (obj,):
                f = getattr(f, "__func__", f)  # staticmethod / classmethod
                if inspect.iscoroutinefunction(f) and getattr(f, "__module__", "").startswith(_ORBAX_READ_MODULES):
                    names.add(f.__qualname__)
    return sorted(names)


def quiet_orbax() -> None:
    """Quiet what Orbax reports that is expected in jaxtune, for this whole process. Call it
    once at the start of a program (`jaxtune run/eval/export/predict` do); calling it again
    installs nothing twice. It installs:

    - on the `absl` logger, a filter that drops Orbax's expected warnings (saves without
      metrics between evaluations; checkpoints opened read-only by `jaxtune eval/export`);
    - on the same filter, the tracebacks Orbax's background threads log for a failed save (a
      full disk): `Checkpoints` raises it as one CheckpointNotSaved;
    - on the `asyncio` logger, a filter that drops the 'exception was never retrieved' records
      of a failed restore's sibling reads (they name a step already reported as damaged) and of
      a failed save's sibling writes (into its temporary folder);
    - a `sys.unraisablehook` wrapper that drops the 'Event loop is closed' callbacks those
      reads make after Orbax closed its loop;
    - a `warnings` filter that ignores "coroutine '...' was never awaited" for the coroutine
      functions of Orbax's read path only (named from its modules; others still warn).

    A failed restore is reported all the same (CheckpointDamaged, a warning): only the echoes
    of its parallel reads are dropped. Without this call they reach stderr, nothing else changes.
    A `warnings.catch_warnings()` block (pytest wraps each test in one) restores the warning
    filters when it ends: call this again inside it.
    """
    for logger, f in (("absl", _expected_warnings), ("asyncio", _sibling_read_errors)):
        if f not in logging.getLogger(logger).filters:
            logging.getLogger(logger).addFilter(f)
    if not getattr(sys.unraisablehook, "_jaxtune", False):
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
    names = _orbax_read_coroutines()
    if names:
        message = f"coroutine '({'|'.join(re.escape(n) for n in names)})' was never awaited"
        if not any(f[0] == "ignore" and getattr(f[1], "pattern", None) == message for f in warnings.filters):
            warnings.filterwarnings("ignore", message=message, category=RuntimeWarning)


def _reason(e: Exception, limit: int = 300) -> str:
    """One line for a failed read. TensorStore chains its causes from general to specific
    ('Error opening ...: Error reading ... of local file F: ... not valid for value of size N')
    and appends its whole spec: keep the specific end, drop the spec.

    >>> _reason(ValueError("OUT_OF_RANGE: Error opening: Error reading file d/1: size 3 [tensorstore_spec=...]"))
    'ValueError: OUT_OF_RANGE: Error opening: Error reading file d/1: size 3'
    >>> _reason(OSError("x" * 400)) == "OSError: ..." + "x" * 300
    True
    """
    first = (str(e).splitlines() or [""])[0].split(" [tensorstore_spec")[0]
    return f"{type(e).__name__}: {first if len(first) <= limit else '...' + first[-limit:]}"


class CheckpointMismatch(JaxtuneError):
    """A readable checkpoint whose arrays do not fit the recipe's model or optimizer."""


class CheckpointNotSaved(JaxtuneError):
    """A save that failed (a full disk, a write error): the run stops; the newest complete
    checkpoint is kept, and the unfinished temporary folder is removed on the next start."""

    exit_code = 1  # the input was fine; the run stopped, like a diverged one


class CheckpointDamaged(JaxtuneError):
    """A checkpoint whose files cannot be read back (a torn write, a disk error, files gone)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass
class Restored:
    step: int
    state: Any
    iterator: Any
    meta: dict


def rank(metric: str, mode: str) -> Callable[[dict], tuple]:
    """Sort key of a checkpoint's metrics: larger is better; NaN or missing is worst; ties go to
    the earlier step (`metrics['step']`)."""
    sign = 1.0 if mode == "max" else -1.0

    def key(metrics: dict) -> tuple:
        value = metrics.get(metric) if metrics else None
        if not isinstance(value, (int, float)) or math.isnan(value):
            score = -math.inf
        else:
            score = sign * float(value)
        return (score, -int((metrics or {}).get("step", 0)))

    return key


def is_better(value: float, best: Optional[float], mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` improves on `best` by more than `min_delta` (NaN never does).

    >>> is_better(0.5, None, "max"), is_better(0.5, 0.5, "max"), is_better(0.4, 0.5, "min")
    (True, False, True)
    >>> is_better(0.52, 0.5, "max", min_delta=0.05)
    False
    """
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


# The JSON files of a step that a restore reads (globs under the step folder): checked before
# Orbax reads them, so that a torn one is reported with its path (Orbax's JSONDecodeError has none).
_JSON_FILES = ("_CHECKPOINT_METADATA", "metrics/metrics", "meta/metadata", "data/*.json",
               "state/_METADATA", "state/array_metadatas/*")


def _unreadable_json(step_dir: Path) -> Optional[str]:
    """'FILE: reason' for the first JSON file of a step folder that does not parse, else None."""
    for pattern in _JSON_FILES:
        for f in sorted(step_dir.glob(pattern)):
            try:
                json.loads(f.read_bytes())
            except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                return f"{f}: {_reason(e)}"
    return None


class _Manager(ocp.CheckpointManager):
    """Orbax's CheckpointManager, except that a step whose metrics file cannot be read does not
    stop it from opening: Orbax reads every step's metrics whenever it lists the steps, and a
    torn file raised a bare JSONDecodeError (no path) from the constructor. Such a step is listed
    without metrics, and `unreadable_metrics` (step -> 'FILE: reason') remembers it."""

    def __init__(self, *args, **kwargs):
        self.unreadable_metrics: dict[int, str] = {}
        super().__init__(*args, **kwargs)

    def _get_metrics(self, step: int):
        try:
            return super()._get_metrics(step)
        except (OSError, ValueError) as e:
            path = self._get_read_step_directory(step, self.directory) / "metrics" / "metrics"
            self.unreadable_metrics[step] = f"{path}: {_reason(e)}"
            return None


def _policy(keep: int, keep_best: int, key: Callable):
    policies = [pp.LatestN(n=keep)]
    if keep_best > 0:
        policies.append(pp.BestN(get_metric_fn=key, n=keep_best, keep_checkpoints_without_metrics=False))
    return pp.AnyPreservationPolicy(policies)


def _abstract(tree):
    """ShapeDtypeStructs with shardings of a pytree of arrays or ShapeDtypeStructs. A leaf
    without a sharding gets this process's first device: Orbax then restores a jax.Array and
    checks shapes (a numpy restore would silently pad or truncate)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        s = ocp.utils.to_shape_dtype_struct(x)
        if getattr(s, "sharding", None) is None:
            s = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=default)
        return s

    return jax.tree.map(one, tree)


class Checkpoints:
    """An Orbax CheckpointManager for a run's `checkpoints/` folder; see the module docstring."""

    def __init__(self, directory, cfg=None, *, metric: str = "accuracy", mode: str = "max",
                 read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        self.directory = Path(directory).absolute()
        self.metric, self.mode = metric, mode
        key = rank(metric, mode)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save,
            preservation_policy=_policy(cfg.keep, cfg.keep_best, key),
            best_fn=key,  # makes Orbax store and reload each step's metrics
            best_mode="max",
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        handlers = {
            "state": ocp.PyTreeCheckpointHandler(),  # PyTree (not Standard): partial restores
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.mngr = _Manager(self.directory, options=options, item_handlers=handlers)
        self._saving: Optional[int] = None  # the step of the last save started
        self._failed: Optional[CheckpointNotSaved] = None

    # -- queries -------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return list(self.mngr.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.mngr.latest_step()

    def metrics(self, step: int) -> Optional[dict]:
        return self.mngr.metrics(step)

    def best_step(self) -> Optional[int]:
        """The best step among those on disk by the eval metric (None if none has metrics).
        CheckpointDamaged if a step's metrics cannot be read: it might be the best."""
        for step in self.steps():
            if step in self.mngr.unreadable_metrics:
                raise self._damaged(step, self.mngr.unreadable_metrics[step])
        scored = [(rank(self.metric, self.mode)(m), s) for s in self.steps() if (m := self.metrics(s))]
        return max(scored)[1] if scored else None

    # -- saving --------------------------------------------------------------------------

    def save(self, step: int, state, iterator, meta: dict, metrics: Optional[dict] = None) -> None:
        """Start saving `step` (returns once arrays are copied off the devices, with async_save).
        `metrics`: the eval metrics of this step, which rank it for keep_best."""
        if metrics is not None:
            metrics = {**{k: float(v) for k, v in metrics.items()}, "step": int(step)}
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta),
        )
        _sibling_read_errors.damaged.discard(f"{self.directory / str(step)}/")  # a new step folder
        self.mngr.unreadable_metrics.pop(step, None)
        self.wait()  # Orbax waits for the previous save anyway: a failure of it is reported as its own
        try:
            self.mngr.save(step, args=args, metrics=metrics, force=True)
        except _WRITE_FAILURES as e:
            raise self._not_saved(step, e) from e
        self._saving = step

    def wait(self) -> None:
        """Block until the last save is finalized (and old steps are removed).
        CheckpointNotSaved if it failed."""
        try:
            self.mngr.wait_until_finished()
        except _WRITE_FAILURES as e:
            raise self._not_saved(self._saving, e) from e

    def close(self) -> None:
        """Wait for the last save and release Orbax's threads; CheckpointNotSaved if the last
        save failed and that was not reported yet."""
        try:
            self.mngr.close()
        except _WRITE_FAILURES as e:
            if self._failed is None:
                raise self._not_saved(self._saving, e) from e

    def _not_saved(self, step: Optional[int], e: Exception) -> CheckpointNotSaved:
        """The error of a failed save (a full disk, a write error), made once: Orbax raises it
        again from every later wait."""
        if self._failed is None:
            kept = sorted((int(p.name) for p in self.directory.iterdir() if p.name.isdigit()), reverse=True)
            kept = [k for k in kept if k != step]
            newest = f"the newest complete checkpoint is step {kept[0]}" if kept else "no checkpoint was completed"
            self._failed = CheckpointNotSaved(
                f"could not save checkpoint step {step} in {self.directory} ({_reason(e)}); {newest}; "
                "free some space (a full disk?) and run the same command to resume")
        return self._failed

    # -- restoring -----------------------------------------------------------------------

    def restore(self, step: int, abstract_state, iterator=None) -> Restored:
        """Restore one step: the state onto the shardings of `abstract_state` (arrays or
        ShapeDtypeStructs), the iterator in place, and the meta dict."""
        target = _abstract(abstract_state)
        items = {
            "state": ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
            "meta": ocp.args.JsonRestore(),
        }
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        out = self._restore(step, ocp.args.Composite(**items), "this recipe's model or optimizer",
                            "; use --restart to start over")
        return Restored(step, out.state, iterator, dict(out.meta or {}))

    def restore_latest(self, abstract_state, make_iterator: Callable[[], Any]) -> Optional[Restored]:
        """The newest checkpoint that restores; unreadable ones are moved aside with a warning.
        None when there is none."""
        for step in sorted(self.steps(), reverse=True):
            try:
                restored = self.restore(step, abstract_state, make_iterator())
            except CheckpointDamaged as e:
                older = [s for s in self.steps() if s < step]
                then = f"falling back to step {max(older)}" if older else "no older checkpoint"
                log.warning("%s; moved it to %s; %s", e, self.move_aside(step), then)
                continue
            # an older step whose metrics are unreadable cannot be ranked: keep-best would delete it
            for other in sorted(set(self.mngr.unreadable_metrics) & set(self.steps())):
                e = self._damaged(other, self.mngr.unreadable_metrics[other])
                log.warning("%s; moved it to %s", e, self.move_aside(other))
            return restored
        return None

    def restore_params(self, step: int, abstract_params) -> Any:
        """Only the params of a step's TrainState (for export and evaluation)."""
        target = {"params": _abstract(abstract_params)}
        args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        out = self._restore(step, ocp.args.Composite(state=args), "the model")
        return out.state["params"]

    def restore_model_state(self, step: int, abstract_model_state) -> Any:
        """Only the `model_state` of a step's TrainState (a BatchNorm model's statistics)."""
        target = {"model_state": _abstract(abstract_model_state)}
        args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        return self._restore(step, ocp.args.Composite(state=args), "the model").state["model_state"]

    def _restore(self, step: int, args, what: str, hint: str = ""):
        """Orbax's restore of `step`, its failures sorted into the two errors a user can act on:
        CheckpointMismatch (readable, but not `what`) and CheckpointDamaged (anything else).
        Any file of the step that a restore reads makes it damaged (the checks come first), even
        if this restore (params only) would not read it: a step is whole or it is not used."""
        folder = f"{self.directory / str(step)}/"
        unreadable = self.mngr.unreadable_metrics.get(step) or _unreadable_json(self.directory / str(step))
        if unreadable:
            raise self._damaged(step, unreadable)
        # echoes of this restore's parallel reads may come while its error propagates: quiet
        # them from the start; kept only if the files turn out to be damaged
        _sibling_read_errors.damaged.add(folder)
        try:
            out = self.mngr.restore(step, args=args)
            _sibling_read_errors.damaged.discard(folder)
            return out
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            # A mismatch keeps the folder listed too: the restore's other reads fail the same way
            # after it is reported, and their echoes (tracebacks, some with TensorStore's whole
            # spec) would follow the one error line.
            if not isinstance(e, _DAMAGE) or first.startswith("RESOURCE_EXHAUSTED"):
                _sibling_read_errors.damaged.discard(folder)
            if isinstance(e, ValueError) and any(m in first for m in _MISMATCH):
                _sibling_read_errors.mismatch_reported = True
                raise CheckpointMismatch(
                    f"checkpoint step {step} in {self.directory} does not fit {what} "
                    f"({first.rstrip(':')}){hint}"
                ) from None
            if not isinstance(e, _DAMAGE) or first.startswith("RESOURCE_EXHAUSTED"):
                raise  # out of memory, a bug: not the files' fault, so no checkpoint is blamed
            raise self._damaged(step, _reason(e)) from e

    def _damaged(self, step: int, reason: str) -> CheckpointDamaged:
        _sibling_read_errors.damaged.add(f"{self.directory / str(step)}/")
        return CheckpointDamaged(f"checkpoint step {step} in {self.directory} cannot be restored ({reason})", step)

    def move_aside(self, step: int) -> Path:
        """Move a damaged step folder to `<checkpoints>.corrupt/<step>-<time>`: out of Orbax's
        way (so the step can be saved again) without deleting anything."""
        dest = self.directory.parent / f"{self.directory.name}.corrupt" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if is_main_process():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(dest))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxtune-move-aside-{step}")
        self.mngr.reload()
        return dest


__all__ = ["CheckpointDamaged", "CheckpointMismatch", "CheckpointNotSaved", "Checkpoints", "Restored", "is_better", "quiet_orbax", "rank"]
