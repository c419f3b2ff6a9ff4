"""tools/bench.py end to end on a tiny BERT: both sides run, the JSON holds consistent figures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("jaxtune_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_json_figures_are_consistent(tiny, tmp_path, capsys):
    path = tiny("bert", "sequence-classification", hidden_act="gelu").path
    out = tmp_path / "bench.json"
    bench = load_bench()
    result = bench.main(["--model", str(path), "--batch", "4", "--seq", "8", "--steps", "3",
                         "--warmup", "1", "--labels", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out
    assert "train examples/s" in printed and "ratio" in printed

    peak = max(result["matmul_peak_gflops"].values())
    for side in ("jaxtune", "pytorch"):
        r = result[side]
        assert r["train_examples_per_s"] == pytest.approx(4 / r["train_step_s"])
        assert r["eval_examples_per_s"] == pytest.approx(4 / r["eval_step_s"])
        # the JSON's peaks are rounded to 0.1 GFLOP/s, the fraction is not
        assert r["train_peak_fraction"] == pytest.approx(r["train_gflops"] / peak, rel=1e-3)
        assert r["train_gflops"] == pytest.approx(r["train_step_gflop"] / r["train_step_s"])
        assert r["eval_gflops"] == pytest.approx(r["eval_step_gflop"] / r["eval_step_s"])
        assert 0 < r["train_examples_per_s"] and 0 < r["eval_examples_per_s"]
    # jaxtune's head runs the last layer for [CLS] alone; transformers runs every token
    assert result["jaxtune"]["eval_step_gflop"] < result["pytorch"]["eval_step_gflop"]
    assert result["train_ratio"] == pytest.approx(
        result["jaxtune"]["train_examples_per_s"] / result["pytorch"]["train_examples_per_s"])
    assert result["eval_ratio"] == pytest.approx(
        result["jaxtune"]["eval_examples_per_s"] / result["pytorch"]["eval_examples_per_s"])


def test_bench_flops_count_matches_a_hand_count():
    bench = load_bench()
    cfg = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1}
    # one layer, batch 1, seq 2: QKV+O 4*2*4*4*2 = 256, FFN 2*2*(4*8*2) = 256, attention
    # 2*2*1*2*2*4 = 64; pooler 2*1*16 = 32, classifier 2*1*(4*3) = 24
    assert bench.encoder_flops(cfg, 1, 2, 3) == {"forward": 632, "train": 1896}
    # the last layer for one query row: K, V 2*2*(4*4*2) = 128, Q+O and FFN 2*1*(2*16+2*32) = 192,
    # attention 2*2*1*1*2*4 = 32; the same 56 for pooler and classifier
    assert bench.encoder_flops(cfg, 1, 2, 3, last_layer_rows=1) == {"forward": 408, "train": 1224}
