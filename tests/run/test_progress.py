"""The loop's bookkeeping as pure functions: best step, early stopping, the log window."""

from __future__ import annotations

import math

from jaxtune.config import EarlyStoppingConfig, TrainConfig
from jaxtune.run.progress import Progress, after_evaluation, after_log_line, after_train_step, window_means


def evals(values, **train):
    """Feed validation accuracies at steps 10, 20, ...; return every intermediate record and note."""
    cfg = TrainConfig(**train)
    p, out = Progress(), []
    for i, v in enumerate(values, start=1):
        p, notes = after_evaluation(p, 10 * i, {"accuracy": v, "loss": 1 - v}, cfg)
        out.append((p, notes))
    return out


def test_best_step_keeps_the_earlier_of_ties_and_skips_nan():
    trail = evals([0.5, 0.7, 0.7, float("nan"), 0.6])
    best = [p.best_step for p, _ in trail]
    assert best == [10, 20, 20, 20, 20]
    p, notes = trail[-1]
    assert p.best_value == 0.7 and p.best_metrics == {"accuracy": 0.7, "loss": 1 - 0.7}
    assert p.last_eval_step == 50 and p.last_eval["accuracy"] == 0.6
    assert trail[1][1] == [" (best)"] and notes == [" (best 0.7000 at step 20)"]


def test_min_mode_picks_the_lowest_loss():
    trail = evals([0.5, 0.7, 0.6], metric="loss", metric_mode="min")
    assert [p.best_step for p, _ in trail] == [10, 20, 20]


def test_early_stopping_counts_evaluations_without_an_improvement_over_min_delta():
    es = EarlyStoppingConfig(metric="accuracy", mode="max", patience=2, min_delta=0.05)
    trail = evals([0.5, 0.53, 0.58, 0.6, 0.61, 0.9], early_stopping=es)
    assert [p.es_bad for p, _ in trail[:5]] == [0, 1, 0, 1, 2]
    assert [p.stopped for p, _ in trail[:5]] == [None] * 4 + ["early_stopping"]
    assert trail[4][1][1] == "early stopping at step 50: validation accuracy has not improved on 0.5800 for 2 evaluations"
    assert trail[1][0].es_best == 0.5 and trail[2][0].es_best == 0.58


def test_no_early_stopping_without_its_config():
    assert all(p.stopped is None for p, _ in evals([0.9, 0.1, 0.1, 0.1, 0.1]))


def test_the_window_means_every_metric_but_lr_and_counts_timed_steps():
    p = Progress()
    p = after_train_step(p, {"loss": 1.0, "lr": 0.1}, None)  # the session's first step: compile
    p = after_train_step(p, {"loss": 3.0, "lr": 0.2}, 0.5)
    assert window_means(p, {"lr": 0.2}) == {"loss": 2.0, "lr": 0.2}
    assert (p.timed_steps, p.train_s, p.window_n) == (1, 0.5, 2)
    p = after_log_line(p)
    assert (p.window_n, p.window_sums, p.timed_steps) == (0, {}, 1)


def test_the_record_survives_a_json_round_trip_and_ignores_unknown_keys():
    p, _ = evals([0.5, 0.6])[-1]
    p = after_train_step(p, {"loss": 2.0}, 1.5)
    again = Progress.from_json({**p.to_json(), "from_a_newer_version": 1})
    assert again == p and not math.isnan(again.best_value)
