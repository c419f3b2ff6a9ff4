"""The loop's order of work, with the actions replaced by recorders: step n+1 is dispatched before
step n's metrics are read, except where an action needs the state; signals stop after a save."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from jaxtune.run import loop
from jaxtune.run.progress import Progress

TOTAL, ACTS = 10, {4, 8, 10}  # steps whose state an action needs (evaluation, checkpoint, end)


class FakeStop:
    def __init__(self, at=None):
        self.at, self.received = at, None

    def should_stop(self, step):
        if step == self.at:
            self.received = "SIGTERM"
        return step == self.at

    def close(self):
        pass


def run_loop(monkeypatch, *, overlap: bool, stop_at=None, start=0):
    events = []
    monkeypatch.setattr(loop, "can_overlap_steps", lambda: overlap)
    monkeypatch.setattr(loop, "StopSignal", lambda multihost: FakeStop(stop_at))

    def train_step(state, batch):
        events.append(("dispatch", batch))
        return state + 1, {"step": batch}

    monkeypatch.setattr(loop, "compile_steps", lambda run: (train_step, "eval"))
    monkeypatch.setattr(loop, "check_metric_names", lambda run: None)
    monkeypatch.setattr(loop, "next_batch", lambda s, step: step)
    monkeypatch.setattr(loop, "checkpoint_due", lambda run, step: step in ACTS)

    def record(s, step, metrics, t0, timed, window):
        assert metrics == {"step": step}
        events.append(("read", step, timed))

    monkeypatch.setattr(loop, "record_step", record)
    monkeypatch.setattr(loop, "evaluate_if_due", lambda s, ev, state, step, w, on_evaluation: events.append(("eval", step)))
    monkeypatch.setattr(loop, "save_if_due", lambda s, step, state, val, stopping: events.append(("save", step, state)))
    monkeypatch.setattr(loop, "finish", lambda s, ev, state, step: {"finished": step, "state": state})
    ckpt = SimpleNamespace(wait=lambda: None, close=lambda: None, directory="ckpt")
    session = SimpleNamespace(run=SimpleNamespace(total_steps=TOTAL, recipe=None), progress=Progress(),
                              state=start, start_step=start, ckpt=ckpt, say=events.append,
                              close=lambda: None, log=SimpleNamespace(main=False))
    return loop.train(session), events


def order(events, *what):
    return [e[:2] for e in events if e[0] in what]


def test_overlapped_loop_dispatches_the_next_step_before_reading_this_one(monkeypatch):
    summary, events = run_loop(monkeypatch, overlap=True)
    assert summary == {"finished": TOTAL, "state": TOTAL}
    seen = order(events, "dispatch", "read")
    for n in range(1, TOTAL + 1):
        read = seen.index(("read", n))
        if n in ACTS:  # the state is needed: read, evaluate and save before the next dispatch
            assert seen.index(("dispatch", n)) < read
            assert events.index(("read", n, True)) < events.index(("eval", n)) < events.index(("save", n, n))
            if n < TOTAL:
                assert events.index(("save", n, n)) < events.index(("dispatch", n + 1))
        else:
            assert seen.index(("dispatch", n + 1)) < read
    assert [e[2] for e in events if e[0] == "read"] == [False] + [True] * (TOTAL - 1)  # first: compile


def test_plain_loop_reads_each_step_before_the_next(monkeypatch):
    _, events = run_loop(monkeypatch, overlap=False)
    seen = order(events, "dispatch", "read")
    assert seen == [x for n in range(1, TOTAL + 1) for x in (("dispatch", n), ("read", n))]


@pytest.mark.parametrize("overlap", [True, False])
def test_a_signal_saves_that_steps_state_and_stops(monkeypatch, overlap):
    summary, events = run_loop(monkeypatch, overlap=overlap, stop_at=6)
    assert summary == {"stopped": "signal", "signal": "SIGTERM", "step": 6}
    assert ("save", 6, 6) in events and ("dispatch", 7) not in order(events, "dispatch")
    assert ("read", 6) in order(events, "read")
    assert any("stopped by SIGTERM at step 6" in e for e in events if isinstance(e, str))


def test_a_resumed_session_starts_after_its_step_and_does_not_time_its_first(monkeypatch):
    summary, events = run_loop(monkeypatch, overlap=True, start=8)
    assert order(events, "dispatch") == [("dispatch", 9), ("dispatch", 10)]
    assert [e[2] for e in events if e[0] == "read"] == [False, True]
    assert summary == {"finished": TOTAL, "state": TOTAL}
