"""tools/retention_text.py reads WordNet's data files: usage examples out of the glosses, the
definition without the attribution debris, a seeded sample in a stable order."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import retention_text  # noqa: E402

LINES = {
    "data.noun": ["  1 This software and database is being provided ...",
                  '00001930 03 n 01 physical_entity 0 000 | an entity that has physical existence; '
                  '"the physical entity was out there somewhere"  '],
    "data.verb": ['00205046 30 v 04 better 0 improve 0 000 | get better; "The weather improved toward evening"; '
                  '"her mood improved a lot"  '],
    "data.adj": ['00001740 00 a 01 ablaze 0 000 | keenly excited; "his face all ablaze with excitement"- Bram Stoker  '],
    "data.adv": ['00001740 02 r 01 fast 0 000 | quickly; "too short"  '],
}


@pytest.fixture
def wordnet(tmp_path):
    for name, lines in LINES.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    return tmp_path


def test_examples_and_definitions(wordnet):
    got = list(retention_text.read_synsets(wordnet))
    assert ("v", "better", "get better", ["The weather improved toward evening", "her mood improved a lot"]) in got
    assert ("a", "ablaze", "keenly excited", ["his face all ablaze with excitement"]) in got
    assert len(got) == 4  # the license header is not a synset
    rows = retention_text.sample(3, seed=0, folder=wordnet)  # 'too short' has < 4 words: no row
    assert [r["lemma"] for r in rows] == ["ablaze", "physical entity", "better"]
    assert rows == retention_text.sample(3, seed=0, folder=wordnet)
    with pytest.raises(SystemExit, match="only 3 synsets"):
        retention_text.sample(4, seed=0, folder=wordnet)


def test_main_writes_jsonl(wordnet, tmp_path):
    out = tmp_path / "out" / "r.jsonl"
    assert retention_text.main([str(out), "--n", "2", "--field", "gloss", "--min-words", "2", "--wordnet", str(wordnet)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["text"] == r["gloss"] for r in rows)
