"""tools/bench.py: the sides take turns in rounds (on a fake clock), and end to end on a tiny BERT
both sides run and the JSON holds consistent figures."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxtune.train

import bench as bench_tool  # tools/bench.py (tools/ is on pytest's pythonpath)


def load_bench():
    return bench_tool


def test_bench_json_figures_are_consistent(tiny, tmp_path, capsys):
    path = tiny("bert", "sequence-classification", hidden_act="gelu").path
    out = tmp_path / "bench.json"
    bench = load_bench()
    result = bench.main(["--model", str(path), "--batch", "4", "--seq", "8", "--rounds", "3", "--steps", "2",
                         "--warmup", "1", "--labels", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out
    assert "train examples/s" in printed and "jaxtune / pytorch" in printed
    assert result["rounds"] == 3 and result["steps_per_round"] == 2

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
    # the ratio: the median over rounds of each round's pytorch / jaxtune step time
    for kind in ("train", "eval"):
        per_round = [p / j for j, p in zip(result["jaxtune"][f"{kind}_step_s_rounds"],
                                           result["pytorch"][f"{kind}_step_s_rounds"])]
        ratio = result["ratios"]["pytorch"][kind]
        assert len(per_round) == 3 and ratio["rounds"] == pytest.approx(per_round)
        assert result[f"{kind}_ratio"] == ratio["median"] == pytest.approx(statistics.median(per_round))
        assert ratio["min"] == pytest.approx(min(per_round)) and ratio["max"] == pytest.approx(max(per_round))
        assert f"{ratio['median']:.2f}x [{ratio['min']:.2f}-{ratio['max']:.2f}]" in printed


def test_bench_flops_count_matches_a_hand_count():
    bench = load_bench()
    cfg = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1}
    # one layer, batch 1, seq 2: QKV+O 4*2*4*4*2 = 256, FFN 2*2*(4*8*2) = 256, attention
    # 2*2*1*2*2*4 = 64; pooler 2*1*16 = 32, classifier 2*1*(4*3) = 24
    assert bench.encoder_flops(cfg, 1, 2, 3) == {"forward": 632, "train": 1896}
    # the last layer for one query row: K, V 2*2*(4*4*2) = 128, Q+O and FFN 2*1*(2*16+2*32) = 192,
    # attention 2*2*1*1*2*4 = 32; the same 56 for pooler and classifier
    assert bench.encoder_flops(cfg, 1, 2, 3, last_layer_rows=1) == {"forward": 408, "train": 1224}


class DriftingMachine:
    """A fake clock and fake steps: each step takes its side's base time times the machine's
    speed factor in that round (a drift of 1.0, 1.5, 0.75, ...), and is logged in call order."""

    def __init__(self, base: dict, drift: list, steps: int):
        self.now, self.calls, self.base, self.drift, self.steps = 0.0, [], base, drift, steps

    def clock(self) -> float:
        return self.now

    def step(self, name: str, kind: str):
        def run():
            round_ = len(self.calls) // (len(self.base) * 2 * self.steps)  # sides x (train, eval) x steps
            self.calls.append((name, kind))
            self.now += self.base[name][kind] * self.drift[round_]
        return run

    def sides(self):
        return {name: {kind: self.step(name, kind) for kind in ("train", "eval")} for name in self.base}


def test_rounds_alternate_the_sides_and_each_round_gives_one_ratio():
    bench = load_bench()
    base = {"jaxtune": {"train": 2.0, "eval": 1.0}, "pytorch": {"train": 3.0, "eval": 1.25}}
    drift = [1.0, 1.5, 0.75, 1.25]  # exact in binary, as the base times
    machine = DriftingMachine(base, drift, steps=2)
    times = bench.alternate(machine.sides(), rounds=4, steps=2, clock=machine.clock)

    # round 0: jaxtune first; round 1: pytorch first; ...: train blocks, then eval blocks
    j, p = "jaxtune", "pytorch"
    one = lambda order, kind: [(s, kind) for s in order for _ in range(2)]  # noqa: E731
    even, odd = one([j, p], "train") + one([j, p], "eval"), one([p, j], "train") + one([p, j], "eval")
    assert machine.calls == even + odd + even + odd

    # each step's time is its base time in that round's speed; a ratio per round, drift cancelled
    assert times["train"][j] == [[2.0 * d] * 2 for d in drift]
    assert times["eval"][p] == [[1.25 * d] * 2 for d in drift]
    assert bench.round_ratios(times, "train", p) == pytest.approx([1.5] * 4)
    assert bench.round_ratios(times, "eval", p) == pytest.approx([1.25] * 4)


def test_the_ratio_is_the_median_over_rounds_and_its_range_shows_a_bad_round():
    bench = load_bench()
    # per-round medians: jaxtune 2, 2, 2, 4 (round 3 slowed by a hiccup), 2; pytorch 3, 2.4, 3.6, 3, 3
    times = {"train": {"jaxtune": [[2.0, 2.0], [1.0, 3.0], [2.0, 2.0], [4.0, 4.0], [2.0, 9.0, 1.0]],
                       "pytorch": [[3.0, 3.0], [2.4, 2.4], [3.6, 3.6], [3.0, 3.0], [3.0, 3.0]]}}
    ratios = bench.round_ratios(times, "train", "pytorch")
    assert ratios == pytest.approx([1.5, 1.2, 1.8, 0.75, 1.5])
    s = bench.spread(ratios)
    assert s["median"] == pytest.approx(1.5) and s["min"] == pytest.approx(0.75) and s["max"] == pytest.approx(1.8)
    assert s["rounds"] == ratios


def test_compare_tree_builds_a_side_from_another_tree_and_puts_this_one_back(tiny, tmp_path, monkeypatch):
    """--compare-tree's mechanism on a copy of this tree: the other side runs the copy's modules,
    and afterwards `import jaxtune` is this tree's again, with the same module objects."""
    bench = load_bench()
    copy = tmp_path / "other"
    shutil.copytree(Path(jaxtune.__file__).parent, copy / "jaxtune", ignore=shutil.ignore_patterns("__pycache__"))
    before = {k: m for k, m in sys.modules.items() if k == "jaxtune" or k.startswith("jaxtune.")}
    path = tiny("bert", "sequence-classification", hidden_act="gelu").path
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(5, 90, (2, 8)).astype(np.int32), "attention_mask": np.ones((2, 8), np.int32),
             "token_type_ids": np.zeros((2, 8), np.int32), "labels": np.array([0, 1], np.int32),
             "weights": np.ones((2,), np.float32)}
    other = bench.jaxtune_side(str(path), batch, 2, warmup=0, tree=str(copy))
    assert other["info"]["tree"] == str(copy)
    assert {k: m for k, m in sys.modules.items() if k == "jaxtune" or k.startswith("jaxtune.")} == before
    assert str(copy) not in sys.path and sys.modules["jaxtune.train"] is jaxtune.train
    other["train"](), other["eval"]()  # the other tree's steps still run, its modules set aside


def test_causal_lm_mode_runs_both_sides_on_a_decoder(tmp_path, capsys):
    """--task causal-lm on a tiny GPT-2: both sides train and evaluate the same batch, every
    position scored; the FLOP count is the decoder's, the same for both sides."""
    import _tiny_gpt2_vit as tg

    path = tmp_path / "gpt2"
    tg.build_hf_model("gpt2", "causal-lm").save_pretrained(path)
    bench = load_bench()
    result = bench.main(["--task", "causal-lm", "--model", str(path), "--batch", "2", "--seq", "8",
                         "--rounds", "2", "--steps", "1", "--warmup", "1"])
    assert result["task"] == "causal-lm" and "causal-lm" in capsys.readouterr().out
    cfg = {**tg.GPT2, "model_type": "gpt2"}
    expected = bench.decoder_flops(cfg, 2, 8)
    for side in ("jaxtune", "pytorch"):
        assert result[side]["train_step_gflop"] == pytest.approx(expected["train"] / 1e9)
        assert result[side]["train_gflops"] > 0 and result[side]["eval_gflops"] > 0


def test_decoder_flops_match_a_hand_count():
    bench = load_bench()
    # Llama-type: D 4, 2 heads of 3, 1 kv head, F 5, V 7, 1 layer, batch 1, seq 2 (tokens 2):
    # q, o 2*2*(4*6*2) = 192, k, v 2*2*(4*3*2) = 96, MLP 2*2*(3*4*5) = 240, attention
    # 2*2*1*2*2*6 = 96, LM head 2*2*4*7 = 112
    llama = {"model_type": "llama", "hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2,
             "head_dim": 3, "num_key_value_heads": 1, "intermediate_size": 5, "vocab_size": 7}
    assert bench.decoder_flops(llama, 1, 2) == {"forward": 736, "train": 2208}
    # GPT-2: D 4, 2 heads (H 2), inner 8: qkv+o 2*2*(4*4*4) = 256, MLP 2*2*(2*4*8) = 256,
    # attention 2*2*1*2*2*4 = 64, LM head 2*2*4*7 = 112
    gpt2 = {"model_type": "gpt2", "n_embd": 4, "n_layer": 1, "n_head": 2, "n_inner": 8, "vocab_size": 7}
    assert bench.decoder_flops(gpt2, 1, 2) == {"forward": 688, "train": 2064}
