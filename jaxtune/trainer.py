"""`jaxtune run`: build everything from a recipe, then train, evaluate, checkpoint and export.

    from jaxtune.config import load_recipe
    from jaxtune.trainer import run
    summary = run(load_recipe("quickstart", ["train.steps=20"]))

The order of things: `parallel.initialize()`; the mesh; the data (its labels size the model's
head and become `id2label`); the model (`from_pretrained` straight onto its shardings, or
`from_config` when `model.config` has `model_type` and there is no `model.path`); the optimizer
(`total_steps` = optimizer updates = train steps / `optim.accumulate`); the TrainState, created on
its shardings or restored from the newest checkpoint. Then the loop, one train step at a time
(each step's metrics are read before the next is dispatched):

- a log line every `train.log_every` steps; an evaluation on the whole validation split every
  `train.eval_every` steps (default: once per epoch) and at the end;
- the best step by `train.metric` / `train.metric_mode` (ties: the earlier step); early stopping
  (`train.early_stopping`: `patience` evaluations without an improvement larger than `min_delta`
  in `metric`, counted from the first evaluation);
- a checkpoint at every evaluation, every `checkpoint.every` steps, at the end, on early stop and
  on SIGTERM / SIGINT (see `jaxtune.checkpoint` for what is kept);
- after the loop: the best checkpoint is evaluated on the test split and exported to
  `<output_dir>/export` (an HF folder with tokenizer files and id2label); `summary.json` and
  `curves.png` are written.

The run folder (`output_dir`, default `runs/<recipe name>`): `config.yaml` (the fully resolved
recipe), `model_config.json` (the model's HF config, for `jaxtune eval/export/predict`),
`metrics.jsonl`, `tensorboard/`, `checkpoints/`, `export/`, `summary.json`, `curves.png`.

Resuming: a run whose folder holds checkpoints continues from the newest readable one and says
so; the result is bit-identical to an uninterrupted run (same machine, same recipe): the
TrainState, the data iterator and the loop's counters all come back, and dropout keys are
`fold_in(state.rng, step)`. `restart=True` (`--restart`) moves the old folder aside to
`<output_dir>.old-<time>` and starts over. A folder with results but no checkpoint is refused
unless `--restart` (nothing is ever deleted).

Stopping: SIGTERM or SIGINT finishes the current step, saves a checkpoint and returns (exit 0);
a second SIGINT aborts at once. With several JAX processes the stop step is agreed through JAX's
preemption sync point (`multihost_utils.reached_preemption_sync_point`), so all hosts save the same
step; there SIGINT is turned into the SIGTERM that JAX's preemption notifier listens to.
A non-finite loss raises `NonFiniteLoss` naming the step (the CLI prints one line and exits 1);
that step's state is not saved, so the newest checkpoint is the last good one.

Test hook: the environment variable `JAXTUNE_INJECT_NAN_STEP=N` turns the example weights of the
N-th train step's batch into NaN and makes that step's loss NaN (used by the tests; off when unset).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from jaxtune.errors import ConfigError, JaxtuneError

NAN_ENV = "JAXTUNE_INJECT_NAN_STEP"
MODEL_CONFIG = "model_config.json"
# What a run that died before its first checkpoint leaves behind: safe to start over on.
_LEFT_BEFORE_FIRST_CHECKPOINT = {"config.yaml", MODEL_CONFIG, "metrics.jsonl", "tensorboard",
                                 "curves.png", "checkpoints"}


class NonFiniteLoss(JaxtuneError):
    """The loss became NaN or infinite; the run stopped before saving that step."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------
# Building the pieces


def image_task(task: str) -> bool:
    return task == "image-classification"


def run_dir_of(recipe) -> Path:
    out = recipe.output_dir or f"runs/{recipe.name or 'run'}"
    if "://" in out:
        raise ConfigError(
            f"output_dir {out}: jaxtune writes run files with ordinary file I/O; mount the bucket "
            "(e.g. gcsfuse) and give the mounted path"
        )
    return Path(out).expanduser().absolute()


def _hf_config(recipe) -> dict:
    """The model's HF config dict: model.path's config.json updated by model.config."""
    from jaxtune.models import hf

    m = recipe.model
    base = hf.read_config(hf.resolve_model_dir(m.path)) if m.path else {}
    return {**base, **m.config}


def _config_overrides(recipe, family) -> dict:
    """model.config plus model.dropout spread over every dropout field of the family's config."""
    m = recipe.model
    overrides = dict(m.config)
    if m.dropout is not None:
        for f in dataclasses.fields(family.config_cls):
            if ("dropout" in f.name or "pdrop" in f.name) and f.name != "classifier_dropout":
                overrides[f.name] = m.dropout
    return overrides


def load_tokenizer_or_images(recipe):
    """(tokenizer, image settings, folder whose tokenizer/preprocessor files an export copies)."""
    from jaxtune.data import image_settings_from_model, load_tokenizer

    path = recipe.model.path
    if image_task(recipe.task):
        return None, (image_settings_from_model(path) if path else None), path
    if not path:
        raise ConfigError(
            "a text model built from model.config alone has no tokenizer; set model.path to a "
            "folder with tokenizer.json"
        )
    return load_tokenizer(path), None, path


def build_data(recipe, tokenizer=None, images=None):
    from jaxtune import data as data_lib

    t = recipe.train
    return data_lib.build_data(
        recipe.data, recipe.task, tokenizer=tokenizer, image_processor=images,
        batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, seed=t.seed,
        problem_type=recipe.model.problem_type,
    )


def build_model(recipe, plan, *, num_labels=None, label_names=None, problem_type=None):
    """(model, loading info) on the plan's shardings; info['fresh'] lists new params."""
    from jaxtune.models import from_config, from_pretrained, get_family
    from jaxtune.tasks import get_task

    m = recipe.model
    head = get_task(recipe.task).head
    hf_config = _hf_config(recipe)
    family = get_family(hf_config.get("model_type"))
    num_labels = m.num_labels or num_labels
    id2label = label_names if label_names and num_labels == len(label_names) else None
    kwargs = dict(
        num_labels=num_labels, id2label=id2label, problem_type=m.problem_type or problem_type,
        dtype=m.dtype, compute_dtype=m.compute_dtype, remat=m.remat,
    )
    if m.path is None:
        model = from_config({**hf_config, **_config_overrides(recipe, family)}, head,
                            shardings=plan.param_shardings, seed=recipe.train.seed, **kwargs)
        from jaxtune.models import split
        from jaxtune.models.trees import flatten

        return model, {"fresh": list(flatten(split(model)[1]))}
    ckpt_labels = len(hf_config.get("id2label") or {}) or hf_config.get("num_labels")
    mismatch = bool(num_labels and ckpt_labels and ckpt_labels != num_labels)
    return from_pretrained(
        m.path, head, config_overrides=_config_overrides(recipe, family),
        shardings=plan.param_shardings, ignore_mismatched_sizes=mismatch, seed=recipe.train.seed,
        output_loading_info=True, **kwargs,
    )


def model_config_dict(model) -> dict:
    """What save_pretrained writes as config.json, plus the jaxtune head's task."""
    from jaxtune.tasks import task_of

    config = model.config.to_hf()
    config["architectures"] = [type(model).hf_architecture]
    config["jaxtune_task"] = task_of(model)
    return config


def total_train_steps(recipe, steps_per_epoch: int) -> int:
    t = recipe.train
    if t.steps is not None:
        return t.steps
    return max(1, math.ceil((t.epochs if t.epochs is not None else 1.0) * steps_per_epoch))


def build_optimizer(recipe, model, params, info, total_steps: int):
    from jaxtune.models import family_of
    from jaxtune.optim import make_optimizer, pretrained_tree

    family = family_of(model)
    updates = max(1, total_steps // recipe.optim.accumulate)
    pretrained = pretrained_tree(params, info.get("fresh", [])) if recipe.model.path else None
    return make_optimizer(
        recipe.optim, params, pretrained=pretrained,
        depth_of=functools.partial(family.depth_of, model.config),
        num_layers=family.num_layers(model.config), total_steps=updates,
    )


def abstract_state(plan, params, param_sh, tx, seed: int):
    """The TrainState as ShapeDtypeStructs carrying their shardings (nothing is allocated)."""
    import jax

    from jaxtune import parallel
    from jaxtune.train import init_state

    init = functools.partial(init_state, tx=tx)
    abstract = jax.eval_shape(init, params, jax.random.PRNGKey(seed), {})
    shardings = parallel.state_shardings(abstract, params, param_sh, plan.mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ---------------------------------------------------------------------------------------------
# The run folder


def _has_checkpoints(out: Path) -> bool:
    d = out / "checkpoints"
    return d.is_dir() and any(p.name.isdigit() and p.is_dir() for p in d.iterdir())


def prepare_run_dir(out: Path, restart: bool, say) -> bool:
    """Make `out` ready; returns whether to resume. Only process 0 moves anything."""
    import jax

    from jaxtune.parallel import is_main_process

    resume = _has_checkpoints(out)
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
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxtune-run-dir")
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    return resume


def _config_changes(old_text: str, new: dict) -> list[str]:
    import yaml

    try:
        old = yaml.safe_load(old_text) or {}
    except yaml.YAMLError:
        return []

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ---------------------------------------------------------------------------------------------
# Signals


class StopSignal:
    """SIGTERM / SIGINT -> stop after the current step. With several processes, JAX's preemption
    sync point decides the step (all hosts stop and save together)."""

    def __init__(self, multihost: bool):
        self.multihost = multihost
        self.received: Optional[str] = None
        self._old = {}
        signals = [signal.SIGINT] if multihost else [signal.SIGTERM, signal.SIGINT]
        for sig in signals:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.multihost:  # JAX's notifier listens to SIGTERM; let it agree on a step
            self.received = name
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.received is None:
            print(f"\n{name}: finishing this step, then saving a checkpoint"
                  + (" (Ctrl-C again to abort)" if signum == signal.SIGINT else ""), flush=True)
        self.received = self.received or name

    def should_stop(self, step: int) -> bool:
        if self.multihost:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
                return True
            return False
        return self.received is not None

    def close(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


# ---------------------------------------------------------------------------------------------
# The loop's bookkeeping (saved in every checkpoint as `meta`, so a resume continues exactly)


@dataclass
class Progress:
    best_step: Optional[int] = None
    best_value: Optional[float] = None
    best_metrics: Optional[dict] = None
    last_eval: Optional[dict] = None
    last_eval_step: Optional[int] = None
    es_best: Optional[float] = None
    es_bad: int = 0
    stopped: Optional[str] = None  # None, 'early_stopping'
    window_n: int = 0  # train steps since the last log line
    window_sums: dict = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0  # training wall time over all sessions (evaluations included)
    timed_steps: int = 0  # steps whose time counts for examples/s (not a session's first: compile)
    train_s: float = 0.0  # their wall time (data + step)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Progress":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _nan_when_weights_are(loss_fn):
    """The test hook's loss: NaN when the batch's weights are (tasks mask padding with
    `where`, which would turn NaN weights into a zero loss and only NaN gradients)."""
    import jax.numpy as jnp

    def poisoned(params, batch, rng):
        loss, aux = loss_fn(params, batch, rng)
        return jnp.where(jnp.any(jnp.isnan(batch["weights"])), jnp.nan, loss), aux

    return poisoned


def _mean_window(p: Progress, last: dict) -> dict:
    """Mean over the window of every metric except lr (the logged step's)."""
    out = {k: v / p.window_n for k, v in p.window_sums.items()}
    if "lr" in last:
        out["lr"] = last["lr"]
    return out


# ---------------------------------------------------------------------------------------------
# The run


def run(recipe, restart: bool = False) -> dict:
    """Train `recipe` (a validated `jaxtune.config.Recipe`); returns the summary dict."""
    from jaxtune import parallel

    parallel.initialize()
    return Trainer(recipe, restart=restart).run()


class Trainer:
    def __init__(self, recipe, restart: bool = False):
        import jax

        from jaxtune import parallel
        from jaxtune.config import dump, replace
        from jaxtune.runlog import RunLog

        self.main = parallel.is_main_process()
        self.out = run_dir_of(recipe)
        self.recipe = recipe = replace(recipe, output_dir=str(self.out))
        self._say = lambda msg: print(msg, flush=True) if self.main else None
        resume = prepare_run_dir(self.out, restart, self._say)
        self.multihost = jax.process_count() > 1

        config_file = self.out / "config.yaml"
        if self.main and resume and config_file.exists():
            from jaxtune.config import to_dict

            changed = _config_changes(config_file.read_text(), to_dict(recipe))
            if changed:
                self._say("note: the recipe differs from the run's config.yaml: " + "; ".join(changed))

        # Mesh, data, model, optimizer.
        self.plan = parallel.Plan.from_config(recipe.mesh)
        self.plan.local_batch_size(recipe.train.batch_size)  # one-line error when it cannot split
        tokenizer, images, self.tokenizer_source = load_tokenizer_or_images(recipe)
        self.data = data = build_data(recipe, tokenizer, images)
        self.model, info = build_model(recipe, self.plan, num_labels=data.num_labels,
                                       label_names=data.label_names, problem_type=data.problem_type)
        from jaxtune.models import split
        from jaxtune.tasks import get_task

        _, params, _ = split(self.model)
        self.task = get_task(recipe.task, self.model.config)
        self.total = total_train_steps(recipe, data.steps_per_epoch)
        self.optimizer = build_optimizer(recipe, self.model, params, info, self.total)
        self.param_sh = self.plan.param_shardings(self.model)
        self.abstract = abstract_state(self.plan, params, self.param_sh, self.optimizer.tx, recipe.train.seed)
        self.has_val = "validation" in data.splits
        self.eval_every = recipe.train.eval_every or data.steps_per_epoch
        self.info = info

        # Checkpoints: restore, or create the state on its shardings.
        from jaxtune.checkpoint import Checkpoints

        self.ckpt = Checkpoints(self.out / "checkpoints", recipe.checkpoint,
                                metric=recipe.train.metric, mode=recipe.train.metric_mode)
        restored = self.ckpt.restore_latest(self.abstract, data.train_iterator) if resume else None
        if resume and restored is None:
            raise JaxtuneError(f"no checkpoint in {self.out / 'checkpoints'} can be restored; "
                               "pass --restart to start over")
        if restored is not None:
            self.state, self.iterator = restored.state, restored.iterator
            self.progress = Progress.from_json(restored.meta)
            self.start_step = restored.step
        else:
            self.state = self.plan.create_state(params, self.optimizer, param_shardings=self.param_sh,
                                                rng=recipe.train.seed)
            self.iterator = data.train_iterator()
            self.progress = Progress()
            self.start_step = 0
        del params
        if self.main:  # only now: a checkpoint that does not fit must not lose the old records
            config_file.write_text(dump(recipe))
            (self.out / MODEL_CONFIG).write_text(json.dumps(model_config_dict(self.model), indent=2))
        self.resumed_from = restored.step if restored is not None else None
        self.log = RunLog(self.out, main=self.main, resume_step=self.start_step if restored else None,
                          total_steps=self.total, log_every=recipe.train.log_every)
        self._describe(info)

    # -- console -------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        self.log.say(msg) if hasattr(self, "log") else self._say(msg)

    def _describe(self, info) -> None:
        import jax

        from jaxtune.models import split
        from jaxtune.models.trees import path_str

        r, d = self.recipe, self.data
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(split(self.model)[1]))
        self.say(d.summary())
        fresh = ", ".join(path_str(p) for p in info.get("fresh", [])[:4]) if r.model.path else "all (from config)"
        self.say(f"model: {type(self.model).__name__} from {r.model.path or 'model.config'}, "
                 f"{n_params / 1e6:.2f}M params" + (f", new: {fresh}" if fresh else ""))
        mesh = " x ".join(f"{k}={v}" for k, v in self.plan.mesh.shape.items())
        epochs = self.total / d.steps_per_epoch
        self.say(f"training {self.total} steps ({epochs:.3g} epochs of {d.steps_per_epoch}, batch "
                 f"{r.train.batch_size}) on {jax.device_count()} {jax.devices()[0].platform} device(s), "
                 f"mesh {mesh}; eval every {self.eval_every} steps; output {self.out}")
        if self.resumed_from is not None:
            self.say(f"resuming from step {self.resumed_from} (checkpoints in {self.out / 'checkpoints'})")
            if self.resumed_from >= self.total or self.progress.stopped:
                self.say("the run is already complete; evaluating and exporting its best checkpoint again")
        if not self.has_val:
            self.say("note: no validation split: no evaluations during training; the last step is exported")

    # -- pieces of the loop --------------------------------------------------------------

    def _evaluate(self, eval_step, state, split: str) -> dict:
        from jaxtune.tasks import evaluate

        batches = (self.plan.shard_batch(b) for b in self.data.eval_batches(split))
        return evaluate(eval_step, state, batches, self.task)

    def _check_metric_names(self, eval_step) -> None:
        """Fail before training when train.metric or early_stopping.metric is not a metric."""
        import jax

        if not self.has_val:
            return
        batch = next(iter(self.data.eval_batches("validation")))
        shapes = jax.eval_shape(eval_step, self.abstract, self.plan.shard_batch(batch))
        zeros = {k: np.zeros(v.shape, np.float64) for k, v in shapes.items()}
        names = list(self.task.metrics(zeros))
        t = self.recipe.train
        wanted = [("train.metric", t.metric)]
        if t.early_stopping is not None:
            wanted.append(("train.early_stopping.metric", t.early_stopping.metric))
        for key, name in wanted:
            if name not in names:
                raise ConfigError(f"{key}: '{name}' is not a validation metric of this task; "
                                  f"choose one of {', '.join(names)}")

    def _nan_step(self) -> Optional[int]:
        v = os.environ.get(NAN_ENV)
        return int(v) if v else None

    def _meta(self) -> dict:
        self.progress.elapsed_s = self.clock.elapsed
        return self.progress.to_json()

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> dict:
        import jax

        from jaxtune.checkpoint import is_better
        from jaxtune.runlog import Stopwatch, fmt_metrics, plot_curves
        from jaxtune.train import make_eval_step, make_train_step
        from jaxtune.tasks import make_eval_fn, make_loss_fn

        r, p = self.recipe, self.progress
        loss_fn = make_loss_fn(self.model, self.task)
        if self._nan_step() is not None:
            loss_fn = _nan_when_weights_are(loss_fn)
        train_step = self.plan.jit_train_step(make_train_step(loss_fn, self.optimizer), self.abstract)
        eval_step = self.plan.jit_eval_step(make_eval_step(make_eval_fn(self.model, self.task)), self.abstract)
        self._check_metric_names(eval_step)
        stop = StopSignal(self.multihost)
        self.clock = Stopwatch(p.elapsed_s)
        es = r.train.early_stopping
        nan_step = self._nan_step()
        state, step = self.state, self.start_step
        bs = r.train.batch_size
        first = True  # a session's first step compiles: not counted in examples/s
        t_window, n_window = time.perf_counter(), 0
        stopped_by = None
        try:
            while step < self.total and p.stopped is None:
                t0 = time.perf_counter()
                batch = next(self.iterator)
                if nan_step == step + 1:
                    batch = {**batch, "weights": batch["weights"] * np.float32("nan")}
                state, metrics = train_step(state, self.plan.shard_batch(batch))
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
                step += 1
                if not first:
                    p.timed_steps, p.train_s = p.timed_steps + 1, p.train_s + time.perf_counter() - t0
                first = False
                n_window += 1
                if not math.isfinite(m["loss"]):
                    self.state = None
                    self.ckpt.wait()
                    last = self.ckpt.latest_step()
                    where = f"step {last} in {self.ckpt.directory}" if last is not None else "none was written"
                    raise NonFiniteLoss(f"non-finite loss ({m['loss']}) at step {step}; stopped without "
                                        f"saving it (last good checkpoint: {where})")
                p.window_n += 1
                for k, v in m.items():
                    if k != "lr":
                        p.window_sums[k] = p.window_sums.get(k, 0.0) + v
                now = time.perf_counter()
                ex_s = n_window * bs / max(now - t_window, 1e-9)
                self.log.progress(step, m, ex_s)
                if step % r.train.log_every == 0 or step == self.total:
                    self.log.write(step, "train", _mean_window(p, m), epoch=step / self.data.steps_per_epoch,
                                   examples_per_s=ex_s, time=self.clock.elapsed)
                    p.window_n, p.window_sums = 0, {}
                    t_window, n_window = now, 0

                val = None
                if self.has_val and (step % self.eval_every == 0 or step == self.total):
                    val = self._evaluate(eval_step, state, "validation")
                    self.log.write(step, "validation", val, epoch=step / self.data.steps_per_epoch)
                    value = val.get(r.train.metric, float("nan"))
                    best = is_better(value, p.best_value, r.train.metric_mode)
                    if best:
                        p.best_step, p.best_value, p.best_metrics = step, value, val
                    p.last_eval, p.last_eval_step = val, step
                    note = " (best)" if best else f" (best {p.best_value:.4f} at step {p.best_step})" \
                        if p.best_value is not None else ""
                    self.say(f"eval step {step}: {fmt_metrics(val)}{note}")
                    if es is not None:
                        es_value = val.get(es.metric, float("nan"))
                        if is_better(es_value, p.es_best, es.mode, es.min_delta):
                            p.es_best, p.es_bad = es_value, 0
                        else:
                            p.es_bad += 1
                            if p.es_bad >= es.patience:
                                p.stopped = "early_stopping"
                                self.say(f"early stopping at step {step}: validation {es.metric} has not "
                                         f"improved on {p.es_best:.4f} for {p.es_bad} evaluations")
                    t_window, n_window = time.perf_counter(), 0  # examples/s: training only

                stopping = stop.should_stop(step)
                every = r.checkpoint.every
                if val is not None or (every and step % every == 0) or step == self.total or stopping \
                        or p.stopped:
                    self.ckpt.save(step, state, self.iterator, self._meta(), metrics=val)
                if stopping:
                    stopped_by = stop.received
                    break
            self.state = state
            self.ckpt.wait()
            stop.close()  # from here a signal acts as usual: the checkpoint is safe
            if stopped_by:
                self.say(f"stopped by {stopped_by} at step {step}: saved a checkpoint in "
                         f"{self.ckpt.directory}; run the same command again to resume")
                summary = {"stopped": "signal", "signal": stopped_by, "step": step}
            else:
                summary = self._finish(eval_step, step)
        finally:
            stop.close()
            try:
                self.ckpt.close()
            finally:
                self.log.close()
                if self.main:
                    try:
                        plot_curves(self.out, r.train.metric)
                    except Exception as e:  # a plot must never fail a run
                        print(f"warning: could not draw curves.png: {e}", flush=True)
        return summary

    # -- after the loop ------------------------------------------------------------------

    def _finish(self, eval_step, step: int) -> dict:
        from jaxtune.models import save_pretrained
        from jaxtune.runlog import fmt_metrics

        r, p, d = self.recipe, self.progress, self.data
        state = self.state
        best = p.best_step if (p.best_step is not None and r.checkpoint.keep_best > 0) else None
        if best is not None and best not in self.ckpt.steps():
            self.say(f"warning: the best checkpoint (step {best}) is gone; using step {step}")
            best = None
        model_step = best if best is not None else step
        if model_step != step:
            from jaxtune.checkpoint import CheckpointDamaged

            try:
                state = state.replace(params=self.ckpt.restore_params(model_step, self.abstract.params))
            except CheckpointDamaged as e:  # the run's own last state is still good: use it
                self.say(f"warning: {e}; moved it to {self.ckpt.move_aside(model_step)}; using step {step}")
                model_step, best = step, None
        test = None
        if "test" in d.splits:
            test = self._evaluate(eval_step, state, "test")
            self.log.write(step, "test", test, model_step=model_step)
        export = self.out / "export"
        save_pretrained(self.model, export, tokenizer=self.tokenizer_source, params=state.params)

        examples_per_s = p.timed_steps * r.train.batch_size / p.train_s if p.train_s > 0 else None
        summary = {
            "name": r.name,
            "task": r.task,
            "model": r.model.path,
            "steps": step,
            "total_steps": self.total,
            "stopped": p.stopped or "completed",
            "best_step": model_step,
            "metric": {"name": r.train.metric, "mode": r.train.metric_mode,  # of the model tested
                       "value": p.best_value if best is not None else (p.last_eval or {}).get(r.train.metric)},
            "validation": p.best_metrics if best is not None else p.last_eval,
            "last_validation": {"step": p.last_eval_step, **(p.last_eval or {})} if p.last_eval else None,
            "test": test,
            "wall_time_s": self.clock.elapsed,
            "train_examples_per_s": examples_per_s,
            "resumed_from": self.resumed_from,
            "export": str(export),
            "data": {
                "num_examples": d.num_examples,
                "steps_per_epoch": d.steps_per_epoch,
                "label_names": d.label_names,
                "dropped_rows": d.report.dropped,
                "files": d.report.to_json(),
            },
        }
        if self.main:
            tmp = self.out / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2, default=str))
            tmp.replace(self.out / "summary.json")
        by = f"best step {model_step} by validation {r.train.metric}" if best is not None else f"step {model_step}"
        if test is not None:
            words = []
            if "accuracy" in test:
                words.append(f"test accuracy {100 * test['accuracy']:.2f}%")
            if "macro_f1" in test:
                words.append(f"macro-F1 {test['macro_f1']:.4f}")
            others = fmt_metrics({k: v for k, v in test.items() if k not in ("accuracy", "macro_f1")})
            self.say(f"{' and '.join(words) or 'test'}{', ' + others if others else ''} "
                     f"on {d.num_examples['test']} test examples ({by})")
        else:
            self.say(f"no test split; validation: {fmt_metrics(summary['validation'] or {})} ({by})")
        speed = f"{examples_per_s:.1f} train examples/s, " if examples_per_s else ""
        self.say(f"done in {self.clock.elapsed:.1f}s ({speed}{step} steps); exported to {export}")
        return summary


__all__ = ["NAN_ENV", "NonFiniteLoss", "Trainer", "build_data", "build_model", "build_optimizer", "run"]
