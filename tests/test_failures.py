"""The table of bad inputs: each one a `jaxtune` subprocess that must exit 2 with exactly one
line on stderr, `error: ...`, naming the culprit (a key, a path, a value), and change nothing
under a pre-existing run folder (its tree is hashed before and after every case).

A new case is one line in CASES: (id, arguments, what the line must contain). Placeholders:
{run} a finished tiny run (do not write into it: that is what is checked), {dmg} a copy whose
step 24 has every file cut to 0 bytes and whose best step 12 has every file cut by one byte,
{t} a folder of bad files (made by `bad_files`), {a} the tiny assets (bert/, data.csv),
{recipe} a good recipe whose output_dir is {run}.
Each case is a real `jaxtune` process with its own argv, exit code and stderr (file descriptor 2),
forked from one that has imported jaxtune already (`_tiny_run.Warm`: the import is paid once, not
49 times); they run two at a time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

import _tiny_run as tr

CASES = [
    # -- recipes and overrides (fail at validation: fast) ----------------------------------
    ("unknown-key", ["run", "{recipe}", "trian.steps=3"], "'trian'"),
    ("not-an-integer", ["run", "{recipe}", "train.steps=abc"], "train.steps"),
    ("missing-task", ["run", "{t}/no_task.yaml"], "'task'"),
    ("unknown-optimizer", ["run", "{recipe}", "optim.name=adamx"], "adamx"),
    ("malformed-override", ["run", "{recipe}", "train.steps"], "train.steps"),
    ("recipe-not-found", ["run", "{t}/missing.yaml"], "missing.yaml"),
    ("invalid-yaml", ["run", "{t}/bad_yaml.yaml"], "bad_yaml.yaml"),
    ("yaml-not-a-mapping", ["run", "{t}/list.yaml"], "list.yaml"),
    ("recipe-is-a-folder", ["run", "{t}"], "{t}"),
    ("bundled-name-typo", ["run", "quickstrat"], "quickstrat"),
    ("unknown-task", ["run", "{recipe}", "task=nope"], "nope"),
    ("zero-batch", ["run", "{recipe}", "train.batch_size=0"], "train.batch_size"),
    ("negative-lr", ["run", "{recipe}", "optim.lr=-1"], "optim.lr"),
    ("bucket-output-dir", ["run", "{recipe}", "output_dir=gs://bucket/run"], "gs://bucket/run"),
    ("fraction-above-1", ["run", "{recipe}", "data.validation_fraction=1.5"], "data.validation_fraction"),
    ("validate-unknown-key", ["validate", "{recipe}", "checkpoint.evry=3"], "checkpoint.evry"),
    # -- data files ------------------------------------------------------------------------
    ("data-not-found", ["run", "{recipe}", "data.train=csv:{t}/missing.csv"], "{t}/missing.csv"),
    ("data-empty", ["run", "{recipe}", "data.train=csv:{t}/empty.csv"], "{t}/empty.csv"),
    ("data-header-only", ["run", "{recipe}", "data.train=csv:{t}/header.csv"], "{t}/header.csv"),
    ("data-ragged-row", ["run", "{recipe}", "data.train=csv:{t}/ragged.csv"], "{t}/ragged.csv"),
    ("data-no-text-column", ["run", "{recipe}", "data.text_column=review"], "review"),
    ("data-no-label-column", ["run", "{recipe}", "data.label_column=stars"], "stars"),
    ("jsonl-bad-line", ["run", "{recipe}", "data.train=jsonl:{t}/bad.jsonl"], "{t}/bad.jsonl"),
    ("data-unknown-scheme", ["run", "{recipe}", "data.train=xls:{t}/x.xls"], "xls"),
    ("data-is-binary", ["run", "{recipe}", "data.train=csv:{t}/binary.csv"], "{t}/binary.csv"),
    ("data-is-a-folder", ["run", "{recipe}", "data.train=csv:{t}"], "{t}"),
    # -- model folders ---------------------------------------------------------------------
    ("model-not-found", ["run", "{recipe}", "model.path={t}/nope"], "{t}/nope"),
    ("model-folder-empty", ["run", "{recipe}", "model.path={t}/empty_model"], "{t}/empty_model"),
    ("model-config-not-json", ["run", "{recipe}", "model.path={t}/bad_config"], "{t}/bad_config/config.json"),
    ("model-type-unknown", ["run", "{recipe}", "model.path={t}/odd_type"], "nope-former"),
    ("model-weights-cut-short", ["run", "{recipe}", "model.path={t}/cut_weights"], "{t}/cut_weights/model.safetensors"),
    ("model-path-is-a-file", ["run", "{recipe}", "model.path={a}/data.csv"], "{a}/data.csv"),
    # -- run folders: eval / export / predict ----------------------------------------------
    ("eval-not-found", ["eval", "{t}/nope"], "{t}/nope"),
    ("eval-neither-run-nor-model", ["eval", "{t}"], "{t}"),
    ("eval-model-folder-without-data", ["eval", "{run}/export"], "--data"),
    ("eval-unknown-split", ["eval", "{run}", "--split", "train2"], "train2"),
    ("eval-non-data-override", ["eval", "{run}", "optim.lr=1"], "optim.lr=1"),
    ("eval-data-not-found", ["eval", "{run}", "--data", "csv:{t}/missing.csv"], "{t}/missing.csv"),
    ("export-into-a-used-folder", ["export", "{run}", "{run}"], "{run}"),
    ("export-unknown-step", ["export", "{run}", "{t}/x", "--step", "999"], "999"),
    ("export-not-a-run", ["export", "{run}/export", "{t}/y"], "{run}/export"),
    ("predict-no-input", ["predict", "{run}/export"], "INPUT"),
    ("predict-sampling-option-alone", ["predict", "{run}/export", "hi", "--temperature", "2"], "--temperature"),
    ("predict-generation-on-a-classifier", ["predict", "{run}/export", "hi", "--max-new-tokens", "3"], "--max-new-tokens"),
    # -- checkpoints -----------------------------------------------------------------------
    ("eval-damaged-step", ["eval", "{dmg}", "--step", "24"], "{dmg}/checkpoints/24/"),
    ("export-damaged-latest", ["export", "{dmg}", "{t}/z", "--latest"], "{dmg}/checkpoints/24/"),
    ("predict-damaged-best", ["predict", "{dmg}", "good great love"], "{dmg}/checkpoints/12/"),
    ("eval-damaged-best", ["eval", "{dmg}"], "{dmg}/checkpoints/12/"),
    ("run-other-model-checkpoint", ["run", "{recipe}", "model.path={t}/wider_bert"], "--restart"),
    # -- being fixed by other agents: add their cases here when they land ------------------
    # unusable output_dir (below a file, /proc, no write permission), unreadable data file
    # (no permission, /proc/self/mem), data.max_length above the model's positions, a model
    # folder without tokenizer files or config.json, TSV quoting (data.quoting)
]


def bad_files(t: Path, assets: Path) -> None:
    (t / "no_task.yaml").write_text("model: {path: x}\n")
    (t / "bad_yaml.yaml").write_text("task: sequence-classification\nmodel: [path\n")
    (t / "list.yaml").write_text("- task\n- model\n")
    (t / "empty.csv").write_text("")
    (t / "header.csv").write_text("text,label\n")
    (t / "ragged.csv").write_text("text,label\ngood day,pos\nbad,neg,extra,fields\n")
    (t / "bad.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label"\n')
    (t / "binary.csv").write_bytes(bytes(range(256)) * 8)
    (t / "empty_model").mkdir()
    for name in ("bad_config", "odd_type", "cut_weights", "wider_bert"):
        shutil.copytree(assets / "bert", t / name)
    (t / "bad_config" / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    config = json.loads((assets / "bert" / "config.json").read_text())
    (t / "odd_type" / "config.json").write_text(json.dumps({**config, "model_type": "nope-former"}))
    w = t / "cut_weights" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(**{**config, "intermediate_size": 48})).save_pretrained(str(t / "wider_bert"))


def tree_hash(folder: Path) -> str:
    """Every path, size and content under `folder`."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    recipe_of, env, ref = tr.shared_tiny(tmp_path_factory)
    root = tmp_path_factory.mktemp("failures")
    run, dmg, t = root / "run", root / "dmg", root / "bad"
    shutil.copytree(ref, run)
    shutil.copytree(ref, dmg)
    for step, cut in ((24, lambda n: 0), (12, lambda n: n - 1)):
        for f in (dmg / "checkpoints" / str(step)).rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[: cut(f.stat().st_size)])
    t.mkdir()
    assets = ref.parent / "assets"
    bad_files(t, assets)
    recipe = recipe_of(run, name="failures")
    raw = yaml.safe_load(recipe.read_text())
    (t / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))  # keep it: recipe_of rewrites by name
    fill = {"run": str(run), "dmg": str(dmg), "t": str(t), "a": str(assets), "recipe": str(t / "recipe.yaml")}
    before = {run: tree_hash(run), dmg: tree_hash(dmg)}

    warm = tr.shared_warm(tmp_path_factory)

    def one(case):
        name, args, _ = case
        return name, warm.run(*[a.format(**fill) for a in args], cwd=t, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(one, CASES))
    after = {run: tree_hash(run), dmg: tree_hash(dmg)}
    return fill, results, before == after


@pytest.mark.parametrize("name, args, culprit", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(table, name, args, culprit):
    fill, results, _ = table
    proc = results[name]
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING:jaxtune:")]  # a new head
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr[-3000:])
    assert culprit.format(**fill) in lines[0], lines[0]


def test_no_case_changed_the_run_folders(table):
    assert table[2], "a case changed a file under the pre-existing run folders"


def test_the_table_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
