"""tools/translation_data.py (the translate_messages_de recipe's data) on catalogs written here:
the .mo reader (both byte orders, a Latin-1 header, context and plural entries), what is left out,
the splits, and the tokenizer; tools/translation_baselines.py's translation memory; the bundled
recipe translate_messages_de reads what the tool writes."""

from __future__ import annotations

import csv
import struct

import pytest
from transformers import AutoTokenizer

from jaxtune.config import find_recipe, load_recipe

import translation_baselines
import translation_data


def write_mo(path, entries: dict[str, str], encoding: str = "utf-8", order: str = "<"):
    """A binary gettext catalog as msgfmt writes one (no hash table), header first."""
    header = f"Content-Type: text/plain; charset={encoding}\n"
    items = sorted([(b"", header.encode("ascii"))] + [(k.encode(encoding), v.encode(encoding))
                                                        for k, v in entries.items()])
    n = len(items)
    ids_at, strs_at = 28, 28 + 8 * n
    at = 28 + 16 * n
    tables, blob = [b"", b""], b""
    for side in (0, 1):
        for item in items:
            tables[side] += struct.pack(order + "2I", len(item[side]), at + len(blob))
            blob += item[side] + b"\0"
    path.write_bytes(struct.pack(order + "7I", 0x950412DE, 0, n, ids_at, strs_at, 0, at) + tables[0] + tables[1] + blob)


@pytest.fixture
def locale_dir(tmp_path):
    d = tmp_path / "LC_MESSAGES"
    d.mkdir()
    write_mo(d / "app.mo", {
        "Open file": "Datei öffnen",
        "menu\x04Save": "Speichern",  # context dropped
        "%d file\x00%d files": "%d Datei\x00%d Dateien",  # plural: the singular pair
        "Copy  \n\t%s\n": "Kopieren\t %s\n",  # whitespace runs -> one space
        "%s: %s": "%s: %s",  # no letter
        "Linux": "Linux",  # untranslated
        "Not yet": "",  # no translation
        "x" * 101: "y",  # over --max-chars
    })
    # big-endian, Latin-1; its "Open file" loses to app.mo's (first catalog by name)
    write_mo(d / "old.mo", {"Close": "Schließen", "Open file": "Datei oeffnen"}, encoding="iso-8859-1", order=">")
    write_mo(d / "iso_3166-1.mo", {"Germany": "Deutschland"})  # a list of names: left out
    write_mo(d / "many.mo", {f"message number {i}": f"Meldung Nummer {i}" for i in range(30)})
    return d


EXPECTED = {"Open file": "Datei öffnen", "Save": "Speichern", "%d file": "%d Datei", "Copy %s": "Kopieren %s",
            "Close": "Schließen", **{f"message number {i}": f"Meldung Nummer {i}" for i in range(30)}}


def read_tsv(path):
    with open(path, newline="") as f:
        return [(r["source"], r["target"]) for r in csv.DictReader(f, delimiter="\t")]


def test_catalogs_become_disjoint_splits_of_distinct_pairs_and_a_tokenizer(locale_dir, tmp_path):
    out = tmp_path / "out"
    translation_data.main(["--locale-dir", str(locale_dir), "--out", str(out), "--test-size", "5",
                           "--validation-size", "3", "--vocab-size", "120"])
    splits = {name: read_tsv(out / f"{name}.tsv") for name in ("train", "validation", "test")}
    assert [len(splits[n]) for n in ("test", "validation")] == [5, 3]
    pairs = [p for rows in splits.values() for p in rows]
    assert dict(pairs) == EXPECTED and len(pairs) == len(EXPECTED)  # each source once, in one split

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("Datei öffnen")["input_ids"]
    assert ids[-1] == 1 and 2 not in ids  # </s> appended; training text has no unknown piece
    assert tok.decode(ids, skip_special_tokens=True) == "Datei öffnen"

    again = tmp_path / "again"  # seeded: the same splits
    translation_data.main(["--locale-dir", str(locale_dir), "--out", str(again), "--test-size", "5",
                           "--validation-size", "3", "--vocab-size", "120"])
    assert read_tsv(again / "test.tsv") == splits["test"]


def test_bad_catalogs_and_too_few_pairs_are_one_line_errors(locale_dir, tmp_path):
    bad = tmp_path / "bad.mo"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match=r"bad\.mo: not a gettext \.mo file"):
        translation_data.read_mo(bad)
    with pytest.raises(SystemExit, match="no .mo catalogs"):
        translation_data.collect(tmp_path / "nowhere", 100)
    with pytest.raises(SystemExit, match="only 35 pairs: too few"):
        translation_data.main(["--locale-dir", str(locale_dir), "--out", str(tmp_path / "o"), "--test-size", "30",
                               "--validation-size", "5"])


def test_translation_memory_proposes_the_nearest_sources_translation():
    memory = translation_baselines.translation_memory(
        ["could not open file %s", "permission denied", "unknown option"],
        ["Datei %s konnte nicht geöffnet werden", "Zugriff verweigert", "unbekannte Option"],
        ["could not open the file %s", "unknown options", "Permission denied!"], chunk=2)
    assert memory == ["Datei %s konnte nicht geöffnet werden", "unbekannte Option", "Zugriff verweigert"]


def test_the_bundled_recipe_reads_what_the_tool_writes_and_states_its_result():
    lines = find_recipe("translate_messages_de").read_text().splitlines()
    assert lines[0] == "# jaxtune run translate_messages_de"
    header = "\n".join(line for line in lines if line.startswith("#"))
    for claim in ("tools/translation_data.py", "test BLEU", "chrF", "min", "translation memory"):
        assert claim in header, claim
    r = load_recipe("translate_messages_de")
    out = translation_data.OUT
    assert r.task == "seq2seq-lm" and r.model.config["model_type"] == "marian" and r.model.path is None
    assert (r.data.train, r.data.validation, r.data.test) == tuple(
        f"tsv:{out}/{name}.tsv" for name in ("train", "validation", "test"))
    assert (r.data.source_column, r.data.target_column) == ("source", "target")
    assert r.model.tokenizer == f"{out}/tokenizer" and r.model.config["vocab_size"] == translation_data.VOCAB_SIZE
    # the ids the tokenizer is built with (pad 0, eos 1) are the model's
    assert (r.model.config["pad_token_id"], r.model.config["eos_token_id"]) == (0, 1)
