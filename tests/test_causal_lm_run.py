"""`jaxtune run` for causal-LM end to end (subprocess, 8 fake CPU devices): a tiny random GPT-2 with
a byte-level BPE tokenizer, JSONL prompt/response pairs, packed rows (data.pack), loss on response
tokens only, perplexity in metrics.jsonl / summary.json, `jaxtune eval` of the run, the export in
transformers (GPT2LMHeadModel, same logits), and `jaxtune predict` generating the same greedy tokens
as transformers' `generate` on the export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from jaxtune.runlog import read_metrics

import _tiny_lm as tl
import _tiny_run as tr
PROMPTS = ["3 plus 4 is", "what is 2 plus 5 ? it is", "9 plus 9 is"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-run")
    a = tl.make_assets(root / "assets")
    recipe = {
        "task": "causal-lm",
        "model": {"path": str(a["model"])},
        "data": {"train": f"jsonl:{a['train']}", "validation": f"jsonl:{a['val']}", "prompt_column": "prompt",
                 "response_column": "response", "max_length": 32, "pack": True, "cache_dir": str(root / "cache")},
        "optim": {"lr": 3e-3, "warmup": 2, "weight_decay": 0.01},
        "train": {"batch_size": 8, "steps": 16, "eval_every": 8, "log_every": 4, "seed": 0,
                  "metric": "perplexity", "metric_mode": "min"},
        "checkpoint": {"every": 8, "keep": 2, "keep_best": 1},
        "output_dir": str(root / "run"),
    }
    path = root / "lm.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    proc = tr.cli("run", path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root / "run", a, proc


def test_run_trains_on_responses_and_reports_perplexity(lm_run):
    from jaxtune.data import load_tokenizer

    run, a, proc = lm_run
    assert "packed: 80 train examples into" in proc.stdout
    lines = read_metrics(run)
    val = [m for m in lines if m["split"] == "validation"]
    assert [m["step"] for m in val] == [8, 16]
    # Loss only on the responses: the validation targets are exactly the response tokens + EOS.
    tok = load_tokenizer(str(a["model"]))
    targets = sum(len(tok(r["response"], add_special_tokens=False)["input_ids"]) + 1 for r in a["val_rows"])
    for m in val:
        assert m["tokens"] == targets
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-6)
    train = [m for m in lines if m["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0  # it learns (random start: ln 300 = 5.7)
    assert val[-1]["loss"] < math.log(300) - 1.0
    summary = json.loads((run / "summary.json").read_text())
    best = min(val, key=lambda m: m["perplexity"])
    assert summary["metric"] == {"name": "perplexity", "mode": "min", "value": best["perplexity"]}
    assert summary["best_step"] == best["step"] and summary["validation"]["perplexity"] == best["perplexity"]


def test_eval_of_the_run_matches_its_best_validation(lm_run):
    from jaxtune.inference import evaluate_path

    run = lm_run[0]
    what, n, metrics, loaded = evaluate_path(run, split="validation")
    summary = json.loads((run / "summary.json").read_text())
    assert n == 20 and loaded.step == summary["best_step"]
    for k in ("loss", "perplexity", "accuracy", "tokens"):
        assert metrics[k] == pytest.approx(summary["validation"][k], rel=1e-5), k


def test_export_reloads_in_transformers_with_the_same_logits(lm_run):
    import torch
    from transformers import GPT2LMHeadModel

    from jaxtune.inference import load

    run = lm_run[0]
    assert (run / "export" / "tokenizer.json").is_file()
    ids = np.array([[19, 262, 285, 258, 40, 7], [19, 262, 30, 0, 0, 0]], np.int32)
    mask = (np.arange(6)[None] < np.array([[6], [3]])).astype(np.int32)
    ours = np.asarray(load(run).model(input_ids=ids, attention_mask=mask).logits)
    hf = GPT2LMHeadModel.from_pretrained(run / "export").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    keep = mask == 1
    assert np.abs(ours - ref)[keep].max() < 1e-4


def hf_greedy(export, prompt, n):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(export)
    model = GPT2LMHeadModel.from_pretrained(export).eval()
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist(), tok


def test_predict_generates_transformers_greedy_tokens(lm_run):
    run = lm_run[0]
    proc = tr.cli("predict", run, *PROMPTS, "--json", "--max-new-tokens", 12)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["input"] for r in results] == PROMPTS
    for r in results:
        want, tok = hf_greedy(run / "export", r["input"], 12)
        assert r["tokens"] == want, r
        assert r["generated"] == tok.decode(want, skip_special_tokens=True)
        assert r["stopped"] == ("eos" if want[-1] == tok.eos_token_id else "length") and len(want) <= 12
    assert any(r["stopped"] == "eos" for r in results)  # trained on responses + EOS: it learned to stop
    # The console line: "prompt" -> "generated", quoted so spaces show.
    plain = tr.cli("predict", run / "export", PROMPTS[0], "--max-new-tokens", 12)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert plain.stdout == f'"{PROMPTS[0]}" -> {json.dumps(results[0]["generated"])}\n'


def test_sampling_is_seeded(lm_run):
    from jaxtune.inference import load, predict

    loaded = load(lm_run[0] / "export")
    assert loaded.task == "causal-lm"
    draw = lambda seed: predict(loaded, PROMPTS[:2], do_sample=True, temperature=3.0, top_k=50, top_p=0.95,
                                seed=seed, max_new_tokens=8)
    first = draw(1)
    assert draw(1) == first
    assert any(draw(s) != first for s in (2, 3, 4))
    greedy = predict(loaded, PROMPTS[:1], max_new_tokens=8)[0]
    assert len(greedy["tokens"]) <= 8


@pytest.mark.parametrize("args, message", [
    (["--top-k", "3"], "--top-k only apply with --sample"),
    (["--sample", "--temperature", "0"], "temperature must be > 0"),
])
def test_generation_option_mistakes_give_one_line(lm_run, args, message):
    proc = tr.cli("predict", lm_run[0] / "export", "hi", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
