"""The `jaxtune` command line.

User mistakes (`JaxtuneError`) print one line, `error: ...`, and exit with code 2; anything else is
a bug and keeps its traceback. Heavy imports (jax, transformers) happen inside commands so that
`jaxtune --help` and `jaxtune validate` stay fast.
"""

from __future__ import annotations

import functools
import sys

import click

from jaxtune import __version__
from jaxtune.errors import JaxtuneError

USER_ERROR = 2


def user_errors(fn):
    """Turn a JaxtuneError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except JaxtuneError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(USER_ERROR)

    return wrapper


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
    from jaxtune.config import load_recipe

    cfg = load_recipe(recipe, overrides)
    from jaxtune.trainer import run

    run(cfg, restart=restart)


@main.command("verify")
@click.argument("model_dir")
@click.option("--task", default=None, help="Head to compare (default: from the checkpoint's architectures).")
@click.option("--atol", default=1e-4, show_default=True, help="Largest max-abs difference that passes.")
@click.option("--batch", default=2, show_default=True, help="Rows in the random batch.")
@click.option("--seq", default=16, show_default=True, help="Tokens per row (rows are right-padded).")
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


if __name__ == "__main__":
    main()
