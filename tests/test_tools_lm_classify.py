"""tools/recipe_splits.py writes exactly a recipe's splits; tools/choice_eval.py scores a causal LM
as a classifier with the same answers as an unpadded, one-row-at-a-time PyTorch forward."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import _tiny_lm
import choice_eval  # tools/ is on pytest's pythonpath

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def write_recipe(tmp_path: Path) -> Path:
    rows = ["text,label"] + [f"row number {i} says {w},{w}" for i, w in
                             enumerate(["yes", "no", "maybe"] * 20)] + ["row number 0 says yes,yes"]  # a duplicate
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"task: sequence-classification\nmodel: {{path: x}}\ndata:\n  train: csv:{tmp_path / 'd.csv'}\n"
                      f"  validation_fraction: 0.2\n  test_fraction: 0.2\n  split_seed: 3\n"
                      f"  cache_dir: {tmp_path / 'cache'}\n")
    return recipe


def test_recipe_splits_are_the_data_layers_splits(tmp_path):
    from jaxtune.config import load_recipe
    from jaxtune.data.pipeline import prepare

    recipe = write_recipe(tmp_path)
    out = tmp_path / "splits"
    run = subprocess.run([sys.executable, str(TOOLS / "recipe_splits.py"), str(recipe), str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    written = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()]
               for s in ("train", "validation", "test")}
    prepared = prepare(load_recipe(recipe).data, "sequence-classification")
    for split, source in prepared.splits.items():
        expected = sorted((source[i]["text"], prepared.label_names[source[i]["label"]]) for i in range(len(source)))
        assert sorted((r["text"], r["label"]) for r in written[split]) == expected
    texts = {s: {r["text"] for r in rows} for s, rows in written.items()}
    assert not texts["train"] & texts["test"] and not texts["validation"] & texts["test"]
    assert sum(map(len, written.values())) == 60  # the duplicate row dropped, as the recipe does
    # a second run refuses to overwrite, in one line
    again = subprocess.run([sys.executable, str(TOOLS / "recipe_splits.py"), str(recipe), str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already exist" in again.stderr and len(again.stderr.splitlines()) == 1


def test_jsonl_rows_may_hold_unicode_line_separators(tmp_path):
    """Real tweets hold U+0085 and U+2028; JSONL lines end at "\\n" only (as jaxtune's reader)."""
    path = tmp_path / "rows.jsonl"
    rows = [{"text": "lounge!\u0099\u0085\u00e4", "sentiment": "neutral"}, {"text": "a\u2028b", "sentiment": "positive"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert choice_eval.read_jsonl(path) == rows


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    assets = _tiny_lm.make_assets(root)
    return assets


def reference_predictions(model_dir: Path, tokenizer, prompts: list[list[int]], firsts: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    likely, greedy = [], []
    with torch.no_grad():
        for ids in prompts:
            logits = hf(torch.tensor([ids])).logits[0, -1].numpy()
            likely.append(int(np.argmax(logits[firsts])))
            top = int(np.argmax(logits))
            greedy.append(firsts.index(top) if top in firsts else -1)
    return np.array(likely), np.array(greedy)


def test_choice_eval_matches_an_unpadded_reference(tiny_chat):
    from jaxtune.data.text import load_tokenizer
    from jaxtune.models import from_pretrained

    # three answers whose first tokens differ (the tiny BPE knows " seven", " eleven", " three")
    rows = [dict(r, answer=[" seven", " eleven", " three"][i % 3]) for i, r in enumerate(tiny_chat["val_rows"])]
    template = "{prompt}"
    tok = load_tokenizer(str(tiny_chat["model"]))
    model = from_pretrained(tiny_chat["model"], task="causal-lm")
    result = choice_eval.evaluate(model, tok, rows, template, "answer", batch_size=4)  # several length buckets

    choices = sorted({r["answer"] for r in rows})
    prompts = [choice_eval.render(tok, template.format(**r)) for r in rows]
    firsts = choice_eval.choice_tokens(tok, prompts[0], choices)
    likely, greedy = reference_predictions(tiny_chat["model"], tok, prompts, firsts)
    truth = np.array([choices.index(r["answer"]) for r in rows])
    assert result["choices"] == choices and result["examples"] == len(rows)
    assert result["likelihood_accuracy"] == pytest.approx(np.mean(likely == truth))
    assert result["likelihood_macro_f1"] == pytest.approx(choice_eval.macro_f1(truth, likely, len(choices)))
    assert result["generated_accuracy"] == pytest.approx(np.mean(greedy == truth))
    assert result["generated_a_choice"] == pytest.approx(np.mean(greedy >= 0))


def test_choice_eval_cli_errors_are_one_line(tiny_chat, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "1 plus 1 is", "answer": "two"}) + "\n")
    run = subprocess.run([sys.executable, str(TOOLS / "choice_eval.py"), str(tiny_chat["model"]), str(data),
                          "--prompt-template", "{question}", "--label-column", "answer"],
                         capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: --prompt-template names column 'question', which the rows lack (they have: prompt, answer)"]
