"""The sweep's Optuna study: where it is stored, what it is, and which process runs which trial.

Storage (`open_storage`): SQLite in the sweep folder by default (`study.db`, Optuna's RDBStorage);
`--storage URL` for any RDB URL (postgresql://, mysql://, a shared sqlite:///); `--storage
journal:PATH` for Optuna's JournalStorage on a JournalFileBackend, whose lock files keep it safe on
NFS (SQLite's locking is not: do not share `study.db` between hosts over NFS).

Which trial a process runs (`claim`): Optuna gives out trial numbers atomically, and a trial in
the queue (WAITING) is popped by one process only. A sweep of N trials counts every trial that
did not fail (complete, pruned, running, waiting); a process asks for a trial only while fewer
than N are counted or one waits in the queue, and keeps the trial only if it is among the N
lowest-numbered counted trials (two processes that ask at once: the later one hands its trial
back as failed, marked `surplus`, never run). So the study ends with exactly N complete or pruned
trials, however many processes share it.

A running trial whose process is gone (`reclaim`): each trial records its owner (host, pid
namespace, pid, the pid's start time) and a heartbeat (a user attribute written every
`HEARTBEAT_S` seconds). On the owner's host a dead pid is seen at once (a rerun after kill -9
continues straight away); from another host, a heartbeat older than `STALE_S` seconds. Such a
trial is failed and re-queued with the same parameters and its reported values by Optuna's
`RetryHeartbeatStaleTrialCallback`; whoever pops it resumes the same run folder from its newest
checkpoint. (Optuna's own heartbeat lives in RDBStorage only and in `study.optimize`; this one
works with every storage and with ask/tell.)
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from jaxtune.errors import ConfigError, JaxtuneError

STUDY_DB = "study.db"
IDENTITY = "jaxtune_sweep"  # study user attribute: the recipe, space, metric and mode
OWNER, HEARTBEAT, SURPLUS = "owner", "heartbeat", "surplus"  # trial user attributes
HEARTBEAT_S = float(os.environ.get("JAXTUNE_SWEEP_HEARTBEAT_S", 20))
STALE_S = float(os.environ.get("JAXTUNE_SWEEP_STALE_S", 120))
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def open_storage(folder: Path, spec: Optional[str]):
    """(Optuna storage, its description) for `--storage` (None: `study.db` in the folder)."""
    if spec is None:
        spec = f"sqlite:///{folder / STUDY_DB}"
    if spec.startswith("journal:"):
        path = Path(spec[len("journal:"):]).expanduser()
        if not path.parent.is_dir():
            raise JaxtuneError(f"--storage {spec}: folder {path.parent} does not exist")
        # the default lock (a symlink) is atomic on NFS, where fcntl locks may not be
        return JournalStorage(JournalFileBackend(str(path))), spec
    if "://" not in spec:
        raise ConfigError(f"--storage {spec}: give an RDB URL (sqlite:///PATH, postgresql://...) or journal:PATH")
    try:
        # a long SQLite timeout: several processes on one study wait for the lock, not fail
        kwargs = {"connect_args": {"timeout": 60}} if spec.startswith("sqlite") else {}
        return RDBStorage(spec, engine_kwargs=kwargs), spec
    except Exception as e:  # a bad URL or an unreachable server: SQLAlchemy's own words
        raise JaxtuneError(f"--storage {spec}: cannot open it ({str(e).splitlines()[0]})") from None


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Processes on one machine open the study one at a time: SQLAlchemy creates a new study.db's
    tables, and the study its identity, with a check-then-create that two processes can race."""
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_study(storage, name: str, identity: dict, direction: str, sampler, pruner) -> optuna.Study:
    """Create the study or load it; a study made for another recipe, space or metric is refused
    (a rerun must not mix trials of two searches)."""
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if IDENTITY not in study.user_attrs:
        study.set_user_attr(IDENTITY, identity)
    differences = _differences(study.user_attrs[IDENTITY], identity)
    if differences:
        raise JaxtuneError(f"the sweep's study {name} was made for another search ({'; '.join(differences[:3])}"
                           f"{'; ...' if len(differences) > 3 else ''}); use another --output, or the same "
                           "recipe, overrides, SPACE and --metric/--mode")
    return study


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out


# ---------------------------------------------------------------------------------------------
# Owners and heartbeats


def _start_ticks(pid: int) -> Optional[int]:
    """The process's start time (clock ticks after boot; Linux), None where unknown. A zombie
    (killed, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _machine() -> str:
    """Host name and pid namespace: two containers with one host name do not see each other's pids."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{socket.gethostname()}|{ns}"


def owner() -> dict:
    pid = os.getpid()
    return {"machine": _machine(), "pid": pid, "start": _start_ticks(pid)}


def owner_alive(o: dict) -> Optional[bool]:
    """Whether the owner process runs; None when it is on another machine (ask its heartbeat)."""
    if not isinstance(o, dict) or o.get("machine") != _machine():
        return None
    pid = o.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    start = _start_ticks(pid)
    if os.path.isdir("/proc"):
        return start is not None and (o.get("start") is None or start == o["start"])  # else pid reused
    return True


class Heartbeat:
    """Writes the trial's owner, then the time every HEARTBEAT_S seconds, until stopped."""

    def __init__(self, trial):
        self.trial, self.stop_event = trial, threading.Event()
        trial.set_user_attr(OWNER, owner())
        trial.set_user_attr(HEARTBEAT, time.time())
        self.thread = threading.Thread(target=self._beat, daemon=True, name="jaxtune-sweep-heartbeat")
        self.thread.start()

    def _beat(self):
        while not self.stop_event.wait(HEARTBEAT_S):
            try:
                self.trial.set_user_attr(HEARTBEAT, time.time())
            except Exception as e:  # a storage hiccup: the next beat may pass; staleness is minutes
                print(f"warning: sweep heartbeat of trial {self.trial.number}: {e}", flush=True)

    def stop(self):
        self.stop_event.set()
        self.thread.join()


def abandoned(t) -> bool:
    """A RUNNING trial whose process is gone (see the module's docstring)."""
    alive = owner_alive(t.user_attrs.get(OWNER))
    if alive is not None:
        return not alive
    beat = t.user_attrs.get(HEARTBEAT)
    if beat is None:  # asked, owner not written yet (or never): its start stands in
        start = t.datetime_start or datetime.datetime.now()
        return (datetime.datetime.now() - start).total_seconds() > STALE_S
    return time.time() - float(beat) > STALE_S


def requeue(study: optuna.Study, number: int) -> bool:
    """Fail a running trial and queue it again (same parameters and reported values) for a
    process to resume; False if another process did it first."""
    try:
        study.tell(number, state=TrialState.FAIL)
    except (UpdateFinishedTrialError, ValueError):  # finished meanwhile (or failed by another)
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
        failed = study.get_trials(deepcopy=True)[number]
        # the queue entry must not inherit the dead owner: popped, it would look abandoned
        # until its new owner writes its name
        failed.user_attrs = {k: v for k, v in failed.user_attrs.items() if k not in (OWNER, HEARTBEAT)}
        retry(study, failed)
    return True


def reclaim(study: optuna.Study) -> list[int]:
    """Requeue every abandoned running trial; their numbers."""
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if abandoned(t) and requeue(study, t.number)]


def claim(study: optuna.Study, n: int):
    """A trial for this process to run, or None when the sweep's N are done or taken."""
    while True:
        reclaim(study)
        trials = study.get_trials(deepcopy=False)
        counted = [t for t in trials if t.state in COUNTED]
        if sum(t.state in DONE for t in trials) >= n:
            return None
        if len(counted) >= n and not any(t.state == TrialState.WAITING for t in counted):
            return None  # every remaining trial runs in another process
        trial = study.ask()
        trials = study.get_trials(deepcopy=False)
        numbers = sorted(t.number for t in trials if t.state in COUNTED)
        # a requeued trial takes its failed original's place, so it always stays
        if numbers.index(trial.number) < n or trials[trial.number].system_attrs.get("retry_history"):
            return trial
        trial.set_user_attr(SURPLUS, True)  # another process asked at the same moment
        study.tell(trial, state=TrialState.FAIL)


def run_number(frozen) -> int:
    """The number of the trial whose run folder a trial uses: its own, or for a requeued trial
    the original's (`retry_history` starts with it)."""
    history = frozen.system_attrs.get("retry_history") or []
    return history[0] if history else frozen.number


__all__ = ["DONE", "Heartbeat", "folder_lock", "STUDY_DB", "abandoned", "claim", "open_storage", "open_study", "owner",
           "owner_alive", "reclaim", "requeue", "run_number"]
