"""A LoRA run (`lora:` in the recipe) end to end on the tiny BERT of tests/_tiny_run.py (real
`jaxtune` subprocesses, 8 fake CPU devices): checkpoints hold only what trains; kill -9 and resume
is bit-identical; export/ is the merged model, which transformers reads with jaxtune's logits;
`jaxtune export` of a checkpoint does the same; bad lora settings are one line, exit 2."""

from __future__ import annotations

import json
import random
import re
import signal
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxtune.runlog import TIMING_KEYS, read_metrics

import _tiny_run

LORA = {"rank": 4, "alpha": 8, "dropout": 0.1}
TOTAL = 24


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    recipe, env = _tiny_run.shared_assets(tmp_path_factory)
    return tmp_path_factory.mktemp("lora-run"), recipe, env


def run(assets, out, **changes):
    root, recipe, env = assets
    path = recipe(out, name=f"lora-{Path(out).name}", lora=dict(LORA), **changes)
    return _tiny_run.cli("run", path, env=env), path


@pytest.fixture(scope="module")
def reference(assets):
    out = assets[0] / "reference"
    proc, path = run(assets, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def state_of(run_dir, step=TOTAL):
    """Every array of a checkpoint step's TrainState, as numpy, by path."""
    import jax
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ocp.PyTreeCheckpointer().restore(Path(run_dir) / "checkpoints" / str(step) / "state")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_checkpoints_hold_only_adapters_head_and_optimizer_state(reference):
    out, proc = reference
    assert "LoRA rank 4 on 12 kernels" in proc.stdout
    state = state_of(out)
    params = [k for k in state if k.startswith("['params']")]
    assert params and all(("lora_a" in k or "lora_b" in k or "['classifier']" in k) for k in params), params
    assert len([k for k in params if "lora_" in k]) == 24  # 2 layers x 6 kernels x (A, B)
    assert not [k for k in state if "model_state" in k]  # the base is never checkpointed
    assert not [k for k in state if "embeddings" in k or "LayerNorm" in k or "pooler" in k]
    moments = [k for k in state if k.startswith("['opt_state']") and state[k].ndim > 0]
    assert moments and all(("lora_" in k or "classifier" in k) for k in moments)


def test_export_is_the_merged_model_transformers_reads_with_jaxtunes_logits(reference, tmp_path):
    import torch
    from click.testing import CliRunner
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from jaxtune.cli import main
    from jaxtune.inference import load

    out, _ = reference
    summary = json.loads((out / "summary.json").read_text())
    ours = load(out)  # the best checkpoint: adapters + head, the base from model.path, merged
    assert ours.step == summary["best_step"]
    tok = AutoTokenizer.from_pretrained(out / "export")
    batch = tok(["good great day", "the food was awful and bad", "paper road"], padding=True, return_tensors="np")
    mine = np.asarray(ours.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits)
    again = tmp_path / "again"
    result = CliRunner().invoke(main, ["export", str(out), str(again)])
    assert result.exit_code == 0, result.output
    for folder in (out / "export", again):
        theirs = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        assert not any("lora" in n for n, _ in theirs.named_parameters())
        with torch.no_grad():
            ref = theirs(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
        np.testing.assert_allclose(mine, ref, atol=1e-4, rtol=0)
    # the adapters moved the base: the merged kernels differ from model.path's (a BertModel: no prefix)
    base = load_file(str(Path(load(out).recipe.model.path) / "model.safetensors"))
    merged = load_file(str(out / "export" / "model.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight"
    assert not np.array_equal(base[key], merged["bert." + key])
    key = "embeddings.word_embeddings.weight"
    assert np.array_equal(base[key], merged["bert." + key])


def test_kill_9_then_resume_is_bit_identical(assets, reference):
    root, recipe, env = assets
    out = root / "killed"
    kill_at = random.Random().randint(5, 20)
    print(f"kill -9 after step {kill_at}")
    proc = _tiny_run.popen("run", recipe(out, name="lora-killed", lora=dict(LORA)), env=env)
    deadline = time.time() + 180
    while not any(m.get("step", 0) >= kill_at for m in read_metrics(out)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    again, _ = run(assets, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step" in again.stdout
    a, b = state_of(reference[0]), state_of(out)
    assert a.keys() == b.keys()
    assert not [k for k in a if not np.array_equal(a[k], b[k])]
    steady = [lambda ms: [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in ms]][0]
    assert steady(read_metrics(reference[0])) == steady(read_metrics(out))
    assert (out / "export" / "model.safetensors").read_bytes() == \
        (reference[0] / "export" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("setting,message", [
    ({"rank": 0}, "lora.rank must be >= 1, got 0"),
    ({"alpha": -2}, "lora.alpha must be >= 0, got -2"),
    ({"targets": "LayerNorm"}, "bert/embeddings/LayerNorm/bias (shape (16,)), which is not the matrix of a linear layer"),
    ({"targets": "attention/self/qkv"}, "matches no parameter; it could match: bert/encoder/layer/N/attention/output/"),
    ({"rnk": 4}, "unknown key 'lora.rnk'; did you mean 'lora.rank'?"),
    ({"base_dtype": "int4"}, "lora.base_dtype: 'int4' is not one of int8, nf4"),
])
def test_bad_lora_settings_are_one_line_exit_2(assets, setting, message):
    root, recipe, env = assets
    out = root / f"bad-{abs(hash(json.dumps(setting))) % 10000}"
    proc = _tiny_run.cli("run", recipe(out, name="lora-bad", lora=setting), env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (out / "checkpoints").exists()


def _peft_logits(base_path, num_labels, folder, batch):
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=num_labels).eval()
    wrapped = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        return wrapped(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()


def test_export_peft_is_read_by_peft_and_model_adapter_continues_from_it(assets, reference, tmp_path):
    """`jaxtune export RUN OUT --peft` -> PeftModel on the base has the run's logits; a recipe with
    `model.adapter: OUT` (no lora section) builds a model with the same logits and trains on."""
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from jaxtune.cli import main
    from jaxtune.config import load_recipe
    from jaxtune.inference import load
    from jaxtune.models import merge, split
    from jaxtune.run.build import build

    root, recipe, env = assets
    out, _ = reference
    ours = load(out)
    tok = AutoTokenizer.from_pretrained(out / "export")
    batch = dict(tok(["good great day", "the food was awful and bad", "paper road"], padding=True,
                     return_tensors="np"))
    mine = np.asarray(ours.model(**batch).logits)
    folder = tmp_path / "peft"
    result = CliRunner().invoke(main, ["export", str(out), str(folder), "--peft"])
    assert result.exit_code == 0, result.output
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["modules_to_save"] == ["classifier"]
    assert config["base_model_name_or_path"] == ours.recipe.model.path
    ref = _peft_logits(ours.recipe.model.path, mine.shape[-1], folder, batch)
    np.testing.assert_allclose(mine, ref, atol=1e-4, rtol=0)

    path = recipe(tmp_path / "from-adapter", name="lora-from-adapter", model__adapter=str(folder),
                  train__steps=4, train__eval_every=2)
    run = build(load_recipe(path))
    assert run.lora.rank == 4 and len(run.lora.targets) == 12
    graphdef, params, rest = split(run.model)  # on the host: the base is on 8 devices, fresh adapters on one
    host = merge(graphdef, jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, rest))
    np.testing.assert_allclose(np.asarray(host(**batch).logits), ref, atol=1e-4, rtol=0)
    proc = _tiny_run.cli("run", path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA rank 4 on 12 kernels" in proc.stdout

    both = recipe(tmp_path / "both", name="lora-both", model__adapter=str(folder), lora=dict(LORA))
    proc = _tiny_run.cli("run", both, env=env)
    assert proc.returncode == 2 and "model.adapter brings its own LoRA settings" in proc.stderr
    bad = recipe(tmp_path / "bad", name="lora-bad-adapter", model__adapter=str(tmp_path))
    proc = _tiny_run.cli("run", bad, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "is not a PEFT adapter folder" in lines[0], proc.stderr
    proc = _tiny_run.cli("export", tmp_path / "from-adapter", tmp_path / "again", "--peft", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "again" / "adapter_model.safetensors").is_file()


def test_a_qlora_run_trains_on_the_nf4_base_and_exports_the_merged_model(assets, reference, tmp_path):
    """lora.base_dtype: nf4 in a recipe (8 fake devices): the run trains, its export (dequantized
    base + adapters) is read by transformers with the logits jaxtune computes from the checkpoint."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from jaxtune.inference import load

    out = tmp_path / "qlora"
    root, recipe, env = assets
    path = recipe(out, name="lora-nf4", lora=dict(LORA, base_dtype="nf4"), train__steps=6)
    proc = _tiny_run.cli("run", path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA rank 4 on 12 kernels (frozen matrices stored nf4)" in proc.stdout
    params = re.compile(r"[\d.]+M params")  # the model's size, not its codes + scales
    assert params.findall(proc.stdout) == params.findall(reference[1].stdout) != []
    ours = load(out)
    tok = AutoTokenizer.from_pretrained(out / "export")
    batch = tok(["good great day", "the food was awful and bad", "paper road"], padding=True, return_tensors="np")
    mine = np.asarray(ours.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits)
    theirs = AutoModelForSequenceClassification.from_pretrained(out / "export").eval()
    with torch.no_grad():
        ref = theirs(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_allclose(mine, ref, atol=1e-4, rtol=0)
