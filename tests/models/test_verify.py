"""`jaxtune verify`: as a user meets it (subprocess, exit codes, no tracebacks).

verify loads ONE folder in both libraries, so a weight perturbed in the file is seen by both and
agrees; what verify exists to catch is jaxtune reading or computing something differently. The
failing case therefore breaks jaxtune on purpose: RoBERTa positions from 0, without the pad offset (the
classic conversion bug).
"""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from jaxtune.models.verify import first_line

BREAK_ROBERTA_POSITIONS = (
    "import sys, jax.numpy as jnp; from jaxtune.models.roberta import modeling as m; "
    "m.RobertaEmbeddings.default_position_ids = "
    "lambda self, ids: jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape); "
    "from jaxtune.cli import main; sys.argv[0] = 'jaxtune'; main()"
)


def run(*args, code="from jaxtune.cli import main; main()"):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def diff_lines(stdout: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[4]) for line in stdout.splitlines() if "max abs diff" in line}


def test_verify_passes_on_an_export_and_fails_on_a_broken_model(tiny, tmp_path):
    from jaxtune.models import from_pretrained, save_pretrained

    folder = save_pretrained(from_pretrained(tiny("roberta", "sequence-classification", num_labels=3).path),
                             tmp_path / "export")
    ok = run("verify", folder, "--batch", "3", "--seq", "12")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Traceback" not in ok.stdout + ok.stderr
    diffs = diff_lines(ok.stdout)
    assert set(diffs) == {"logits", "last_hidden_state"} and max(diffs.values()) <= 1e-4

    bad = run("verify", folder, code=BREAK_ROBERTA_POSITIONS)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
    assert diff_lines(bad.stdout)["last_hidden_state"] > 1e-2 and "FAIL" in bad.stderr


def test_verify_bad_folder_exits_2_with_one_line(tmp_path):
    out = run("verify", tmp_path / "missing")
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and out.stderr.strip().count("\n") == 0
    assert "Traceback" not in out.stdout + out.stderr


def test_verify_reports_pooler_and_a_head_missing_from_the_checkpoint(tiny):
    from jaxtune.cli import main

    path = str(tiny("bert", "base").path)
    base = CliRunner().invoke(main, ["verify", path])
    assert base.exit_code == 0, base.output
    assert set(diff_lines(base.output)) == {"last_hidden_state", "pooler_output"}
    # Both libraries initialise the missing classifier at random, differently: exit 1.
    head = CliRunner().invoke(main, ["verify", path, "--task", "sequence-classification"])
    assert head.exit_code == 1, head.output
    assert diff_lines(head.output)["logits"] > 1e-4 >= diff_lines(head.output)["last_hidden_state"]


def test_verify_without_torch_exits_2(tiny, monkeypatch):
    from jaxtune.cli import main

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    result = CliRunner().invoke(main, ["verify", str(tiny("bert", "base").path)])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "PyTorch" in result.output
    assert result.output.count("\n") == 1


def test_an_error_message_that_starts_with_a_newline_is_still_one_line():
    # transformers' ImportError for timm folders starts with "\n"; an empty message names its type
    assert first_line(ImportError("\nTimmWrapper requires the timm library\nsee ...")) == \
        "TimmWrapper requires the timm library"
    assert first_line(RuntimeError("")) == "RuntimeError"
