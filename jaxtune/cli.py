"""The `jaxtune` command line.

User mistakes (`JaxtuneError`) print one line, `error: ...`, and exit with code 2; anything else is
a bug and keeps its traceback. `jaxtune run` stopped by SIGTERM or Ctrl-C while it loads (before
its loop starts) prints one line, `stopped by SIGTERM during start-up, ...`, and exits with 128 +
the signal's number (143, 130), as a process ended by that signal would. Heavy imports (jax,
transformers) happen inside commands so that `jaxtune --help` and `jaxtune validate` stay fast.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import signal
import sys
import warnings

import click

from jaxtune import __version__
from jaxtune.errors import JaxtuneError

USER_ERROR = 2


def quiet_checkpoints() -> None:
    """Commands that read or write checkpoints quiet Orbax's expected noise (see
    `jaxtune.checkpoint.quiet_orbax`); imported here, not at start-up, to keep --help fast."""
    from jaxtune.checkpoint import quiet_orbax

    quiet_orbax()


def user_errors(fn):
    """Turn a JaxtuneError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except JaxtuneError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(getattr(e, "exit_code", USER_ERROR))  # e.g. a diverged run exits 1

    return wrapper


class StoppedDuringStartup(BaseException):
    """SIGTERM / SIGINT before `jaxtune run`'s loop starts. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way out can swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_during_startup():
    """Until the run's loop installs its own handlers (`jaxtune.run.signals.StopSignal`: finish
    the step, save), SIGTERM and SIGINT raise `StoppedDuringStartup` in the main thread: loading
    stops at once, and the run's start takes back what it did to the folder on the way out
    (`jaxtune.run.session.open_session`). A second signal acts as it would without jaxtune.
    Returns a function that puts the previous handlers back where this one is still installed."""
    previous = {}

    def restore():
        for sig, old in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, old)

    def handler(signum, frame):
        restore()
        raise StoppedDuringStartup(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    handler.replaced = dict(previous)  # what StopSignal puts back when the loop is over
    return restore


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="jaxtune")
def main():
    """Fine-tune pretrained Hugging Face models in JAX.

    \b
    jaxtune run quickstart                      run a bundled recipe
    jaxtune run my.yaml train.steps=100         run a recipe file with overrides
    """


@main.command("ls")
def ls_cmd():
    """List the bundled recipes, one line each."""
    from jaxtune.config import bundled_recipes, recipe_header

    recipes = bundled_recipes()
    width = max((len(n) for n in recipes), default=0)
    for name, path in recipes.items():
        click.echo(f"{name.ljust(width)}  {recipe_header(path)}")


@main.command("validate")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@user_errors
def validate_cmd(recipe, overrides):
    """Validate RECIPE (a path or bundled name) with KEY=VALUE overrides; print the result."""
    from jaxtune.config import dump, load_recipe

    click.echo(dump(load_recipe(recipe, overrides)), nl=False)


@main.command("run")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--restart", is_flag=True, help="Start over even if output_dir holds checkpoints.")
@user_errors
def run_cmd(recipe, overrides, restart):
    """Run RECIPE (a path or bundled name) with KEY=VALUE overrides."""
    restore_signals = stop_during_startup()
    try:
        from jaxtune.config import load_recipe

        cfg = load_recipe(recipe, overrides)
        quiet_checkpoints()
        from jaxtune.run import run

        run(cfg, restart=restart)
    except StoppedDuringStartup as e:
        click.echo(f"stopped by {e} during start-up, before any step: nothing to save", err=True)
        sys.exit(128 + e.signum)
    finally:
        restore_signals()


@main.command("sweep")
@click.argument("recipe")
@click.argument("space")
@click.argument("overrides", nargs=-1)
@click.option("--trials", type=int, default=None,
              help="Trials that end complete or pruned (default: the grid's size, else 10).")
@click.option("--sampler", default="tpe", show_default=True, help="grid, random or tpe (Optuna's samplers).")
@click.option("--pruner", default="median", show_default=True, help="none, median or hyperband.")
@click.option("--metric", default=None, help="Validation metric to optimise (default: the recipe's train.metric).")
@click.option("--mode", default=None, help="max or min (default: the recipe's for its metric; min for losses).")
@click.option("--output", default=None, help="Sweep folder (default: sweeps/<recipe name>).")
@click.option("--storage", default=None, metavar="URL",
              help="Study storage: an RDB URL or journal:PATH (several hosts; default: OUTPUT/study.db).")
@click.option("--seed", type=int, default=None, help="Sampler seed (default: random).")
@user_errors
def sweep_cmd(recipe, space, overrides, trials, sampler, pruner, metric, mode, output, storage, seed):
    """Search hyperparameters of RECIPE over the ranges in the SPACE file, with Optuna.

    \b
    jaxtune sweep quickstart space.yaml train.steps=200 --trials 8
    jaxtune sweep my.yaml grid.yaml --sampler grid --pruner none --output sweeps/grid

    Rerun the same command to continue a stopped sweep; run it in several processes to share it.
    """
    if importlib.util.find_spec("optuna") is None:  # an optional dependency: the sweep extra
        raise JaxtuneError("jaxtune sweep needs Optuna: pip install 'jaxtune[sweep]'")
    quiet_checkpoints()
    from jaxtune.sweep import sweep

    try:
        sweep(recipe, space, overrides, trials=trials, sampler=sampler, pruner=pruner, metric=metric, mode=mode,
              output=output, storage=storage, seed=seed)
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to resume the sweep", err=True)
        sys.exit(128 + signal.SIGINT)


@main.command("verify")
@click.argument("model_dir")
@click.option("--task", default=None, help="Head to compare (default: from the checkpoint's architectures).")
@click.option("--atol", default=1e-4, show_default=True, help="Largest max-abs difference that passes.")
@click.option("--batch", default=2, show_default=True, help="Rows in the random batch.")
@click.option("--seq", default=16, show_default=True,
              help="Tokens per row (rows are right-padded; speech models: samples, at least two receptive fields).")
@user_errors
def verify_cmd(model_dir, task, atol, batch, seq):
    """Compare jaxtune with transformers (PyTorch) on MODEL_DIR; exit 1 above --atol."""
    from jaxtune.models.verify import verify

    task, diffs = verify(model_dir, task, batch=batch, seq=seq)
    click.echo(f"{model_dir} (task {task}, batch {batch}x{seq}, padded, fp32)")
    for name, diff in diffs.items():
        click.echo(f"  {name:<18} max abs diff {diff:.3e}  {'ok' if diff <= atol else 'FAIL'}")
    if any(not diff <= atol for diff in diffs.values()):  # NaN fails too
        click.echo(f"FAIL: above atol {atol:g}", err=True)
        sys.exit(1)
    click.echo(f"ok: every output within atol {atol:g}")


@main.command("eval")
@click.argument("path")
@click.argument("overrides", nargs=-1)
@click.option("--data", "data_spec", default=None, metavar="SPEC",
              help="Evaluate this data spec in full (csv:PATH, tfds:NAME:SPLIT, ...) instead of the run's data.")
@click.option("--split", default=None, help="Split of the run's data (default: test, else validation).")
@click.option("--step", type=int, default=None, help="Checkpoint step of a run (default: the best).")
@click.option("--batch-size", type=int, default=None, help="Examples per batch (default: the run's).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@user_errors
def eval_cmd(path, overrides, data_spec, split, step, batch_size, as_json):
    """Metrics of PATH (a run folder or an HF model folder) over a whole split.

    \b
    jaxtune eval runs/quickstart                       test split, best checkpoint
    jaxtune eval runs/quickstart/export --data csv:new.csv data.text_column=tweet
    """
    from jaxtune.inference import evaluate_path
    from jaxtune.runlog import fmt_metrics

    quiet_checkpoints()
    what, n, metrics, loaded = evaluate_path(path, data=data_spec, split=split, overrides=overrides,
                                             step=step, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps({"model": loaded.source, "data": what, "examples": n, **metrics}))
    else:
        click.echo(f"{loaded.source}: {what} ({n} examples)")
        click.echo(f"  {fmt_metrics(metrics)}")


@main.command("export")
@click.argument("run_dir")
@click.argument("out_dir")
@click.option("--best", "which", flag_value="best", default=True, help="The best checkpoint (default).")
@click.option("--latest", "which", flag_value="latest", help="The newest checkpoint.")
@click.option("--step", type=int, default=None, help="The checkpoint of this step.")
@click.option("--peft", is_flag=True, help="A LoRA run's adapters as a PEFT adapter folder (not merged).")
@user_errors
def export_cmd(run_dir, out_dir, which, step, peft):
    """Write an HF folder (transformers loads it) from a checkpoint of RUN_DIR into OUT_DIR;
    with --peft, a PEFT adapter folder (peft.PeftModel.from_pretrained loads it onto the base)."""
    from jaxtune.inference import export_peft, export_run

    quiet_checkpoints()
    if peft:
        click.echo(f"exported the adapters of {export_peft(run_dir, out_dir, step=step, best=which != 'latest')} "
                   f"to {out_dir}")
        return
    loaded = export_run(run_dir, out_dir, step=step, best=which != "latest")
    click.echo(f"exported {loaded.source} to {out_dir}")


@main.command("predict")
@click.argument("model_dir")
@click.argument("inputs", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input.")
@click.option("--max-new-tokens", type=int, default=None,
              help="Causal LM: tokens to generate at most (default 50, fewer if positions run out).")
@click.option("--sample", is_flag=True, help="Causal LM: sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=None,
              help="Causal LM, --sample: softmax temperature (default 1.0).")
@click.option("--top-k", type=int, default=None,
              help="Causal LM, --sample: keep the k most likely tokens (default 0: all).")
@click.option("--top-p", type=float, default=None,
              help="Causal LM, --sample: nucleus mass to keep (default 1.0: all).")
@click.option("--seed", type=int, default=None, help="Causal LM, --sample: random seed (default 0).")
@click.option("--raw", is_flag=True,
              help="Causal LM: feed each prompt as plain text, not as a user message in the tokenizer's chat template.")
@click.option("--num-beams", type=int, default=None,
              help="Seq2seq LM: beam search with this many beams (default 1: greedy).")
@user_errors
def predict_cmd(model_dir, inputs, as_json, max_new_tokens, sample, temperature, top_k, top_p, seed, raw, num_beams):
    """Predict with MODEL_DIR (an HF folder or a run folder) for each INPUT.

    Classifiers print the label with its probability, then the runners-up; token classifiers
    print word/TAG for each whitespace-separated word; causal LMs print "prompt" -> "generated";
    seq2seq LMs print "source" -> "generated target".
    INPUTs are texts for text models (prompts for causal LMs) and image paths for image models;
    speech models (task ctc) take WAV/FLAC files and print each one's greedy transcript.
    A causal LM whose tokenizer has a chat template gets each prompt as a one-turn user message
    in it (with the generation prompt) and prints the reply; --raw feeds the prompt as it is.

    \b
    jaxtune predict runs/quickstart "what a great day"
    jaxtune predict runs/lm "3 plus 4 is" --max-new-tokens 20
    jaxtune predict runs/lm "Once upon a time" --sample --temperature 0.8 --top-p 0.9 --seed 1
    """
    from jaxtune.inference import load, predict
    from jaxtune.tasks import TASKS, task_module

    quiet_checkpoints()
    if not inputs:
        raise JaxtuneError("give at least one INPUT to predict")
    generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                  "seed": seed, "num_beams": num_beams}
    given = [f"--{k.replace('_', '-')}" for k, v in generation.items() if v is not None]
    given += ["--sample"] if sample else []
    given += ["--raw"] if raw else []
    sampling_only = [o for o in given if o not in ("--max-new-tokens", "--sample", "--raw", "--num-beams")]
    if sampling_only and not sample:
        raise JaxtuneError(f"{', '.join(sampling_only)} only apply with --sample")
    loaded = load(model_dir)
    task = loaded.task_object()
    options = {k: v for k, v in {**generation, "do_sample": sample, "chat_template": not raw}.items()
               if k in task.predict_options and (v is not None or k in ("do_sample", "chat_template"))}
    if given and not options:
        generating = [t for t in TASKS if "do_sample" in task_module(t).make().predict_options]
        raise JaxtuneError(f"{', '.join(given)}: generation options apply to {', '.join(generating)} models, "
                           f"and {model_dir} is a {loaded.task} model")
    results = predict(loaded, list(inputs), **options)
    for r in results:
        click.echo(json.dumps(r) if as_json else task.format(r))


def entry():
    """The console script: tune host memory before any thread starts, then run the command."""
    from jaxtune.host_memory import keep_host_memory

    user_errors(keep_host_memory)()
    # A save that fails mid-write (a full disk) leaves orbax's write coroutines unawaited; Python
    # reports each one at exit, after the one error line that already says what happened.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    main()


if __name__ == "__main__":
    entry()
