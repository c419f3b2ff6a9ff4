"""What a run writes for people to watch: metrics.jsonl, TensorBoard events, console lines, a PNG.

- `metrics.jsonl`: one JSON object per line, each with `step` (train steps taken), `split`
  (`train`, `validation` or `test`) and the metric names (`loss`, `accuracy`, `macro_f1`, `lr`,
  ...); train lines add `epoch`, `examples_per_s` and `time` (seconds of training so far), and
  hold the mean of every step metric (`loss`, `accuracy`, `grad_norm`, ...) over the steps since
  the previous train line, except `lr` (the logged step's). The test line (the best model on the
  test split) adds `model_step`. NaN and infinities are written as `null`. With `data.retention`,
  `retention` lines (step 0 and every evaluation) hold the retention measure (`jaxtune.retention`).
- On resume from step S, lines after S (and the `test` line of a finished run) are dropped, so the
  file reads as if the run had never stopped (the means of a log window that straddles the stop
  are exact too: the partial sums travel in the checkpoint). TensorBoard gets `purge_step = S + 1`
  (0 on a fresh start) for the same.
- The console: a tqdm bar (step, loss, lr, examples/s) when stdout is a terminal, otherwise a
  plain line every `train.log_every` steps. Only JAX process 0 writes anything.
- `curves.png`: train loss and the validation metrics against the step (`plot_curves`), and the
  retention measure when there is one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure
from tensorboardX import SummaryWriter
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
TIMING_KEYS = ("time", "examples_per_s")  # differ between runs; everything else is reproducible


def _clean(v):
    """JSON-safe numbers: NaN/inf become null (strict JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(run_dir) -> list[dict]:
    """The lines of a run's metrics.jsonl (a torn last line, from a kill, is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(run_dir, step: Optional[int]) -> None:
    """Keep the lines of steps <= `step` (none when `step` is None), except test lines."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = [] if step is None else [m for m in read_metrics(run_dir)
                                    if m.get("step", 0) <= step and m.get("split") != "test"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in keep))
    tmp.replace(path)


def fmt_metrics(m: dict, keys=None) -> str:
    """'accuracy 0.8123, macro-F1 0.8010, loss 0.4711, perplexity 1.602, tokens 201'
    (accuracy and macro-F1 first; fractions and losses to 4 decimals; counts as integers).

    >>> fmt_metrics({"loss": 2.5, "perplexity": 12182.49, "tokens": 201.0, "accuracy": 0.1})
    'accuracy 0.1000, loss 2.5000, perplexity 12182.5, tokens 201'
    """
    names = {"macro_f1": "macro-F1"}
    order = ["accuracy", "macro_f1"] + [k for k in m if k not in ("accuracy", "macro_f1")]
    parts = []
    for k in order:
        if k in m and (keys is None or k in keys) and isinstance(m[k], (int, float)):
            v = m[k]
            fixed = k in ("accuracy", "macro_f1", "label_accuracy", "loss", "mse", "mae", "pearson")
            if fixed:
                text = f"{v:.4f}"
            elif float(v).is_integer():
                text = f"{int(v)}"
            else:
                text = f"{v:.1f}" if abs(v) >= 1000 else f"{v:.4g}"
            parts.append(f"{names.get(k, k)} {text}")
    return ", ".join(parts)


class RunLog:
    """metrics.jsonl + TensorBoard + console for one run (process 0 writes; others no-op)."""

    def __init__(self, run_dir, *, main: bool = True, resume_step: Optional[int] = None,
                 total_steps: int = 0, log_every: int = 10, tty: Optional[bool] = None):
        self.dir = Path(run_dir)
        self.main = main
        self.log_every = log_every
        self.total = total_steps
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.bar = None
        self.tb = None
        self._file = None
        if not main:
            return
        truncate_metrics(self.dir, resume_step)
        self._file = open(self.dir / METRICS_FILE, "a")
        purge = 0 if resume_step is None else resume_step + 1  # drop what a resume redoes
        self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge, flush_secs=30)

    # -- files ---------------------------------------------------------------------------

    def write(self, step: int, split: str, metrics: dict, **extra) -> dict:
        line = {"step": int(step), "split": split, **{k: _clean(v) for k, v in extra.items()},
                **{k: _clean(float(v)) for k, v in metrics.items()}}
        if not self.main:
            return line
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in line.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{split}/{k}", v, int(step))
        return line

    # -- console -------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def progress(self, step: int, metrics: dict, examples_per_s: float) -> None:
        """After every train step: the bar (TTY) or a line every log_every steps."""
        if not self.main:
            return
        loss, lr = metrics.get("loss", float("nan")), metrics.get("lr", float("nan"))
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(total=self.total, initial=step - 1, unit="step", dynamic_ncols=True)
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {examples_per_s:.1f} ex/s", refresh=False)
        elif step % self.log_every == 0 or step == self.total:
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.3e}  {examples_per_s:.1f} examples/s",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        # A full disk must not turn the error that stopped the run into a traceback here.
        tb, f, self.tb, self._file = self.tb, self._file, None, None
        for what, closer in (("tensorboard/", tb), (METRICS_FILE, f)):
            if closer is not None:
                try:
                    closer.close()
                except OSError as e:
                    print(f"warning: could not finish {self.dir / what}: {e}", file=sys.stderr, flush=True)


def plot_curves(run_dir, metric: Optional[str] = None) -> Optional[Path]:
    """curves.png: train loss (left) and validation loss and `metric` (right) against the step."""
    lines = read_metrics(run_dir)
    train = [m for m in lines if m.get("split") == "train" and m.get("loss") is not None]
    val = [m for m in lines if m.get("split") == "validation"]
    if not train and not val:
        return None
    retention = [m for m in lines if m.get("split") == "retention"]  # data.retention (jaxtune.retention)
    # A Figure without pyplot: no global backend or figure registry to set or clean up.
    fig = Figure(figsize=(15 if retention else 10, 4))
    a, b, *more = fig.subplots(1, 3 if retention else 2)
    a.plot([m["step"] for m in train], [m["loss"] for m in train], label="train loss")
    vl = [m for m in val if m.get("loss") is not None]
    if vl:
        a.plot([m["step"] for m in vl], [m["loss"] for m in vl], "o-", label="validation loss")
    a.set_xlabel("step")
    a.set_title("loss")
    a.legend()
    names = [metric] if metric and metric != "loss" else []
    names += [k for k in ("accuracy", "macro_f1") if k not in names]
    for k in names:
        pts = [m for m in val if isinstance(m.get(k), (int, float))]
        if pts:
            b.plot([m["step"] for m in pts], [m[k] for m in pts], "o-", label=k)
    b.set_xlabel("step")
    b.set_title("validation")
    if b.get_legend_handles_labels()[0]:
        b.legend()
    if retention:
        _plot_retention(more[0], retention)
    fig.tight_layout()
    out = Path(run_dir) / PLOT_FILE
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    tmp.replace(out)
    return out


def _plot_retention(ax, lines: list[dict]) -> None:
    """The retention metrics against the step (step 0: the pretrained model); perplexity, which
    lives on another scale, on its own right-hand axis."""
    names = [k for k in lines[0] if k not in ("step", "split", "perplexity")]
    for k in names:
        pts = [m for m in lines if isinstance(m.get(k), (int, float))]
        ax.plot([m["step"] for m in pts], [m[k] for m in pts], "o-", label=k)
    pts = [m for m in lines if isinstance(m.get("perplexity"), (int, float))]
    if pts:
        right = ax.twinx()
        right.plot([m["step"] for m in pts], [m["perplexity"] for m in pts], "s--", color="tab:red",
                   label="perplexity")
        right.set_ylabel("perplexity")
        right.legend(loc="lower right")
    ax.set_xlabel("step")
    ax.set_title("retention (step 0: pretrained)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right")


class Stopwatch:
    """Seconds of training, resumable: `elapsed` carries over from a checkpoint's meta."""

    def __init__(self, elapsed: float = 0.0):
        self.base = elapsed
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.base + time.perf_counter() - self.t0


__all__ = ["METRICS_FILE", "PLOT_FILE", "RunLog", "Stopwatch", "TIMING_KEYS", "fmt_metrics",
           "plot_curves", "read_metrics", "truncate_metrics"]
