"""The loop's bookkeeping, saved in every checkpoint as `meta` so that a resume continues exactly,
and the pure functions that advance it.

    p = after_train_step(p, metrics, timed_s)      # the log window, examples/s bookkeeping
    p = after_log_line(p)                          # a new log window
    p, notes = after_evaluation(p, step, val, train_cfg)   # best step, early stopping

Best step: by `train.metric` / `train.metric_mode`, ties to the earlier step. Early stopping
(`train.early_stopping`): `patience` evaluations without an improvement larger than `min_delta`
in its `metric`, counted from the first evaluation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Optional

from jaxtune.checkpoint import is_better


@dataclass(frozen=True)
class Progress:
    best_step: Optional[int] = None
    best_value: Optional[float] = None
    best_metrics: Optional[dict] = None
    last_eval: Optional[dict] = None
    last_eval_step: Optional[int] = None
    es_best: Optional[float] = None
    es_bad: int = 0
    stopped: Optional[str] = None  # None, 'early_stopping', or a loop hook's reason ('pruned')
    window_n: int = 0  # train steps since the last log line
    window_sums: dict = field(default_factory=dict)
    elapsed_s: float = 0.0  # training wall time over all sessions (evaluations included)
    timed_steps: int = 0  # steps whose time counts for examples/s (not a session's first: compile)
    train_s: float = 0.0  # their wall time (data + step)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Progress":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def after_train_step(p: Progress, metrics: dict, timed_s: Optional[float]) -> Progress:
    """Add a step's metrics (all but `lr`) to the log window; `timed_s` None: not timed."""
    sums = dict(p.window_sums)
    for k, v in metrics.items():
        if k != "lr":
            sums[k] = sums.get(k, 0.0) + v
    timed = {} if timed_s is None else {"timed_steps": p.timed_steps + 1, "train_s": p.train_s + timed_s}
    return replace(p, window_n=p.window_n + 1, window_sums=sums, **timed)


def window_means(p: Progress, last: dict) -> dict:
    """Mean over the window of every metric except lr (the last step's)."""
    out = {k: v / p.window_n for k, v in p.window_sums.items()}
    if "lr" in last:
        out["lr"] = last["lr"]
    return out


def after_log_line(p: Progress) -> Progress:
    """A log line was written: start a new window."""
    return replace(p, window_n=0, window_sums={})


def after_evaluation(p: Progress, step: int, val: dict, train_cfg) -> tuple[Progress, list[str]]:
    """Record an evaluation: the best step and early stopping. Returns the new record and what to
    say (the eval line's suffix first, then an early-stopping line if it stopped)."""
    value = val.get(train_cfg.metric, float("nan"))
    best = is_better(value, p.best_value, train_cfg.metric_mode)
    if best:
        p = replace(p, best_step=step, best_value=value, best_metrics=val)
    p = replace(p, last_eval=val, last_eval_step=step)
    notes = [" (best)" if best else f" (best {p.best_value:.4f} at step {p.best_step})"
             if p.best_value is not None else ""]
    es = train_cfg.early_stopping
    if es is not None:
        es_value = val.get(es.metric, float("nan"))
        if is_better(es_value, p.es_best, es.mode, es.min_delta):
            p = replace(p, es_best=es_value, es_bad=0)
        else:
            p = replace(p, es_bad=p.es_bad + 1)
            if p.es_bad >= es.patience:
                p = replace(p, stopped="early_stopping")
                notes.append(f"early stopping at step {step}: validation {es.metric} has not "
                             f"improved on {p.es_best:.4f} for {p.es_bad} evaluations")
    return p, notes


__all__ = ["Progress", "after_evaluation", "after_log_line", "after_train_step", "window_means"]
