"""tools/forgetting_table.py: every variant is a valid override of the `forgetting` recipe, and the
table is read from the runs' summary.json (the tested model's retention, not the last step's)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import forgetting_table  # noqa: E402
from jaxtune.config import load_recipe  # noqa: E402


def test_variants_are_valid_recipes():
    for name, (_, overrides) in forgetting_table.VARIANTS.items():
        r = load_recipe("forgetting", overrides)
        assert r.data.retention == "jsonl:data/forgetting/retention.jsonl", name
    assert load_recipe("forgetting", forgetting_table.VARIANTS["freeze"][1]).optim.freeze == [
        "bert/embeddings/", "bert/encoder/layer/[0-2]/"]


def test_table_reads_the_tested_models_retention(tmp_path, monkeypatch):
    monkeypatch.setattr(forgetting_table, "RUNS", tmp_path)
    for name, rho in (("plain", 0.31), ("lora", 0.93)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({
            "best_step": 126, "steps": 189, "test": {"accuracy": 0.7, "macro_f1": 0.65},
            "session": {"wall_time_s": 600.0},
            "retention": {"measure": "embedding", "pretrained": {"rank_correlation": 1.0},
                          "last": {"step": 189, "rank_correlation": 0.1, "cosine_to_pretrained": 0.5},
                          "model_step": {"step": 126, "rank_correlation": rho, "cosine_to_pretrained": 0.8}}}))
    text = forgetting_table.write_table()
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| full fine-tune") and "| 0.3100 |" in lines[2]
    assert "| 0.9300 |" in lines[3] and "126 / 189" in lines[3]
    assert json.loads((tmp_path / "table.json").read_text())[1]["last_rank_correlation"] == 0.1
