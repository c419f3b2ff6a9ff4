"""Which process runs which trial (`jaxtune.sweep.study`), on a real SQLite study without jaxtune
runs: a trial whose owner died or whose heartbeat went stale is requeued with its parameters and
reported values; a live one is left alone; a process never takes more than N trials."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from jaxtune.errors import JaxtuneError
from jaxtune.sweep import study as st


@pytest.fixture
def study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store, _ = st.open_storage(tmp_path, None)
    return st.open_study(store, "s", {"space": {"x": 1}}, "maximize", optuna.samplers.RandomSampler(seed=0), None)


def running(study, owner, beat):
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    trial.report(0.5, 4)
    trial.set_user_attr(st.OWNER, owner)
    trial.set_user_attr(st.HEARTBEAT, beat)
    return trial


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_dead_owner_here_and_stale_heartbeat_elsewhere_are_requeued(study):
    dead = running(study, {**st.owner(), "pid": dead_pid()}, time.time())
    stale = running(study, {"machine": "elsewhere|x", "pid": 1, "start": 1}, time.time() - st.STALE_S - 5)
    live_here = running(study, st.owner(), time.time() - 10 * st.STALE_S)  # this process: alive
    live_there = running(study, {"machine": "elsewhere|x", "pid": 1, "start": 1}, time.time())
    assert st.reclaim(study) == [dead.number, stale.number]
    trials = study.get_trials()
    assert [t.state for t in trials[:4]] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert [t.system_attrs["retry_history"] for t in queued] == [[dead.number], [stale.number]]
    assert [t.params for t in queued] == [trials[0].params, trials[1].params]
    assert [t.intermediate_values for t in queued] == [{4: 0.5}, {4: 0.5}]
    assert [st.run_number(t) for t in queued] == [0, 1]
    assert st.reclaim(study) == []  # nothing new; live_here and live_there stay
    assert live_here.number == 2 and live_there.number == 3


def test_claim_takes_queued_trials_first_and_never_more_than_n(study):
    dead = running(study, {**st.owner(), "pid": dead_pid()}, time.time())
    running(study, {"machine": "elsewhere|x", "pid": 1, "start": 1}, time.time())  # another host's
    trial = st.claim(study, 3)
    assert st.run_number(study.get_trials()[trial.number]) == dead.number  # the requeued one
    assert trial.params == study.get_trials()[dead.number].params
    # N=3: the requeued trial, the other host's and one new
    new = st.claim(study, 3)
    assert new is not None and st.run_number(study.get_trials()[new.number]) == new.number
    assert st.claim(study, 3) is None  # three counted: all taken
    for t in (trial, new):
        study.tell(t, 1.0)
    assert st.claim(study, 3) is None  # two done, one running elsewhere
    counted = [t for t in study.get_trials() if t.state != TrialState.FAIL]
    assert len(counted) == 3


def test_surplus_trial_is_handed_back(study, monkeypatch):
    """Two processes ask for the last place at once: the higher number gives its trial back."""
    ask = study.ask

    def racing_ask():
        monkeypatch.setattr(study, "ask", ask)
        ask()  # the other process's ask lands first (it has not written its owner yet: alive)
        return ask()

    monkeypatch.setattr(study, "ask", racing_ask)
    assert st.claim(study, 1) is None
    other, mine = study.get_trials()
    assert other.state == TrialState.RUNNING
    assert mine.state == TrialState.FAIL and mine.user_attrs[st.SURPLUS] is True


def test_a_study_for_another_search_is_refused(tmp_path):
    store, _ = st.open_storage(tmp_path, None)
    st.open_study(store, "s", {"space": {"x": 1}, "metric": "accuracy"}, "maximize", None, None)
    st.open_study(store, "s", {"space": {"x": 1}, "metric": "accuracy"}, "maximize", None, None)  # the same
    with pytest.raises(JaxtuneError, match=r"space.x 1 -> 2"):
        st.open_study(store, "s", {"space": {"x": 2}, "metric": "accuracy"}, "maximize", None, None)


def test_owner_alive_knows_pid_reuse_and_other_machines():
    me = st.owner()
    assert st.owner_alive(me) is True
    assert st.owner_alive({**me, "start": me["start"] + 1}) is False  # the pid now names another process
    assert st.owner_alive({**me, "pid": dead_pid()}) is False
    assert st.owner_alive({**me, "machine": "elsewhere|x"}) is None
    assert os.getpid() == me["pid"]
