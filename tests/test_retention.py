"""Retention (`data.retention`, jaxtune.retention): each measure against transformers (PyTorch) on
the same texts, the run's records (metrics.jsonl, TensorBoard, curves.png, summary.json) with the
pretrained reference at step 0, and bad retention data as one line before training (that a resume
logs each retention step once is tested with EWC's resume, tests/test_ewc.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr
from tensorboardX.proto import event_pb2
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, GPT2LMHeadModel

import _tiny_lm
import _tiny_run
from jaxtune.config import load_recipe
from jaxtune.errors import ConfigError, DataError
from jaxtune.retention import mask_tokens
from jaxtune.run import run
from jaxtune.run.build import build
from jaxtune.runlog import read_metrics

TEXTS = ["the day was long", "a movie about the road", "green paper on the table", "seven happy days",
         "it is very sad", "quite a nice food", "the road is green", "love the movie", "poor awful day",
         "the food was great"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention")
    recipe = _tiny_run.make_assets(root)
    ret = root / "retention.jsonl"
    ret.write_text("".join(json.dumps({"sentence": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    mlm = root / "mlm"  # a BERT whose checkpoint has its masked-LM head
    mlm.mkdir()
    tok = _tiny_run.make_tokenizer(mlm)
    torch.manual_seed(1)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=32, initializer_range=0.3)
                    ).save_pretrained(str(mlm))
    return root, recipe, ret, mlm


def _recipe(assets, out, **changes):
    root, recipe, ret, _ = assets
    changes = {"data__retention": f"jsonl:{ret}", "data__retention_column": "sentence", **changes}
    return recipe(out, name=out.name, **changes)


def _pooled(model, tok, texts) -> np.ndarray:
    enc = tok(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return ((h * m).sum(1) / m.sum(1)).numpy().astype(np.float64)


def _pair_cosines(e):
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    i, j = np.triu_indices(len(e), 1)
    return (e[i] * e[j]).sum(1)


def _tb_tags(folder: Path) -> set[str]:
    """Scalar tags in a TensorBoard folder's event files (TFRecord framing, Event protos)."""
    tags = set()
    for f in folder.glob("events.out.tfevents.*"):
        data, pos = f.read_bytes(), 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            tags |= {v.tag for v in event.summary.value}
            pos += 12 + n + 4
    return tags


@pytest.fixture(scope="module")
def embedding_run(assets, tmp_path_factory):
    """The tiny BERT classifier (no MLM head: the embedding measure), 8 steps, evals at 4 and 8,
    exporting the last step."""
    out = tmp_path_factory.mktemp("emb") / "run"
    path = _recipe(assets, out, train__steps=8, train__eval_every=4, checkpoint__every=None, checkpoint__keep_best=0)
    summary = run(load_recipe(path))
    return path, out, summary


def test_embedding_measure_matches_torch_and_is_logged_everywhere(assets, embedding_run):
    root = assets[0]
    _, out, summary = embedding_run
    lines = [m for m in read_metrics(out) if m["split"] == "retention"]
    assert [m["step"] for m in lines] == [0, 4, 8]
    assert lines[0]["rank_correlation"] == pytest.approx(1.0, abs=1e-9)
    assert lines[0]["cosine_to_pretrained"] == pytest.approx(1.0, abs=1e-6)
    # the last step (exported) against transformers: pretrained vs fine-tuned pooled embeddings
    tok = AutoTokenizer.from_pretrained(str(root / "bert"))
    before = _pooled(BertModel.from_pretrained(str(root / "bert")).eval(), tok, TEXTS)
    after = _pooled(BertModel.from_pretrained(str(out / "export")).eval(), tok, TEXTS)
    rho = spearmanr(_pair_cosines(before), _pair_cosines(after)).statistic
    cos = np.mean((before * after).sum(1) / np.linalg.norm(before, axis=1) / np.linalg.norm(after, axis=1))
    assert lines[-1]["rank_correlation"] == pytest.approx(rho, abs=1e-4)
    assert lines[-1]["cosine_to_pretrained"] == pytest.approx(cos, abs=1e-4)
    assert rho < 0.999  # fine-tuning moved the geometry: the measure can tell
    r = summary["retention"]
    assert r["measure"] == "embedding" and r["texts"] == len(TEXTS)
    assert r["pretrained"] == {k: lines[0][k] for k in ("rank_correlation", "cosine_to_pretrained")}
    assert r["last"] == r["model_step"] == {k: lines[-1][k] for k in ("step", "rank_correlation",
                                                                      "cosine_to_pretrained")}
    assert json.loads((out / "summary.json").read_text())["retention"] == r
    assert {"retention/rank_correlation", "retention/cosine_to_pretrained"} <= _tb_tags(out / "tensorboard")
    assert Image.open(out / "curves.png").size[0] == 1200  # three panels (15 in at 80 dpi): retention's added


def _fresh_state(r):
    return r.plan.create_state(r.params, r.optimizer, param_shardings=r.param_shardings, rng=0)


def test_masked_lm_measure_matches_torch_with_the_frozen_head_over_the_current_backbone(assets, tmp_path):
    _, _, _, mlm = assets
    r = build(load_recipe(_recipe(assets, tmp_path / "mlm", model__path=str(mlm))))
    ret = r.retention
    assert ret.measure == "masked-lm"
    assert "cls" in ret.frozen and "bert" not in ret.frozen  # only the head is kept; the backbone is the run's
    state = _fresh_state(r)
    moved = {**state.params, "bert": jax.tree.map(lambda x: x * 1.1, state.params["bert"])}
    got = [ret.evaluate(state), ret.evaluate(state.replace(params=moved))]
    ref = BertForMaskedLM.from_pretrained(str(mlm)).eval()
    want = []
    for scale in (1.0, 1.1):
        if scale != 1.0:
            with torch.no_grad():
                for p in ref.bert.parameters():  # the tied decoder moves with the word embeddings
                    p.mul_(scale)
        loss_sum = n = correct = 0.0
        for i, b in enumerate(ret.data.eval_batches("train")):
            b = mask_tokens(b, mask_id=ret.mask_id, special_ids=ret.special_ids, seed=i)
            with torch.no_grad():
                logits = ref(input_ids=torch.tensor(b["input_ids"], dtype=torch.long),
                             attention_mask=torch.tensor(b["attention_mask"])).logits
            labels = torch.tensor(b["labels"], dtype=torch.long)
            w = torch.tensor(b["weights"])[:, None] * (labels != -100)
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
            loss_sum += float((ce * w).sum())
            correct += float(((logits.argmax(-1) == labels) * w).sum())
            n += float(w.sum())
        want.append((loss_sum / n, correct / n))
    for g, (loss, acc) in zip(got, want):
        assert g["mlm_loss"] == pytest.approx(loss, abs=1e-4)
        assert g["mlm_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert got[0]["mlm_loss"] != pytest.approx(got[1]["mlm_loss"], abs=1e-3)


def test_perplexity_measure_matches_torch(tmp_path):
    a = _tiny_lm.make_assets(tmp_path / "lm")
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(json.dumps({
        "task": "causal-lm", "model": {"path": str(a["model"])},
        "data": {"train": f"jsonl:{a['train']}", "validation": f"jsonl:{a['val']}", "retention": f"jsonl:{a['val']}",
                 "max_length": 32, "cache_dir": str(tmp_path / "cache")},
        "train": {"batch_size": 8, "steps": 2}, "output_dir": str(tmp_path / "out")}))
    r = build(load_recipe(recipe))
    assert r.retention.measure == "perplexity"
    got = r.retention.evaluate(_fresh_state(r))
    tok = AutoTokenizer.from_pretrained(str(a["model"]))
    ref = GPT2LMHeadModel.from_pretrained(str(a["model"])).eval()
    loss_sum = n = 0.0
    for row in a["val_rows"]:
        ids = tok(row["text"])["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0, :-1]
        loss_sum += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        n += len(ids) - 1
    assert got["loss"] == pytest.approx(loss_sum / n, abs=1e-4)
    assert got["perplexity"] == pytest.approx(np.exp(loss_sum / n), rel=1e-4)


def test_bad_retention_data_is_one_line_before_training(assets, tmp_path):
    root = assets[0]
    with pytest.raises(DataError) as e:
        build(load_recipe(_recipe(assets, tmp_path / "r1", data__retention_column="sentense")))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.retention (jsonl:") and "no column 'sentense'" in msg
    assert "(data.retention_column)" in msg
    empty = root / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"^data\.retention \(jsonl:.*empty") as e:
        build(load_recipe(_recipe(assets, tmp_path / "r2", data__retention=f"jsonl:{empty}")))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="data.retention_column names the column of data.retention"):
        build(load_recipe(assets[1](tmp_path / "r3", name="r3", data__retention_column="sentence")))
    proc = _tiny_run.cli("run", _recipe(assets, tmp_path / "r4", data__retention_column="nope"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.retention (jsonl:")
    assert "Traceback" not in proc.stderr and not (tmp_path / "r4" / "metrics.jsonl").exists()
