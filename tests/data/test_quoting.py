"""CSV and TSV quotes are read as pandas and Python's csv module read them by default
(`data.quoting: minimal`); `data.quoting: none` reads files with bare quotes; the cache key holds
the option; unreadable files are one line naming the file and the OS's reason. No tokenizer."""

import csv
import os
from pathlib import Path

import pytest

from jaxtune.data import DataError, parse_spec, prepare

HEADER = ["id", "product", "title", "review", "stars", "helpful", "label"]
# The texts a real review file holds: quotes around and inside, tabs, commas, line breaks.
REVIEWS = [
    '"Best purchase ever" - that is what I said',  # starts with a quote: written """Best..."
    'It says "waterproof"\nbut the second line\nsays otherwise',  # line breaks inside quotes
    "tab\tinside, and a comma",
    'a 5" screen, "quite" small',  # quotes in the middle
    'ends with a quote "',
    "plain text",
]


def write_pandas_like(path: Path, n: int = 24, delimiter: str = "\t") -> list[str]:
    """A file as pandas' to_csv(sep='\\t') writes one: QUOTE_MINIMAL, doubled quotes, '\\n' lines."""
    texts = []
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(HEADER)
        for i in range(n):
            text = f"{REVIEWS[i % len(REVIEWS)]} #{i}"
            texts.append(text)
            w.writerow([i, f"B00{i}", f'"Title" {i}', text, 1 + i % 5, i * 3, ("pos", "neg")[i % 2]])
    return texts


def _texts(prepared, split="train") -> list[str]:
    s = prepared.splits[split]
    return [s[i]["text"] for i in range(len(s))]


def test_a_tsv_written_like_pandas_reads_back_exactly(cfg, tmp_path):
    texts = write_pandas_like(tmp_path / "reviews.tsv")
    raw = (tmp_path / "reviews.tsv").read_text()
    assert '"""Best purchase ever"" - that' in raw and '"tab\tinside' in raw  # really quoted
    p = prepare(cfg(train=f"tsv:{tmp_path}/reviews.tsv", text_column="review", validation_fraction=0.0),
                "sequence-classification", cache_dir=tmp_path / "cache")
    assert _texts(p) == texts  # in file order; quotes, tabs and line breaks kept
    assert p.label_names == ["neg", "pos"]
    assert "line breaks inside a text" in str(p.report)  # counted as a note, not dropped


def test_a_csv_written_like_pandas_reads_back_exactly(cfg, tmp_path):
    texts = write_pandas_like(tmp_path / "reviews.csv", delimiter=",")
    p = prepare(cfg(train=f"csv:{tmp_path}/reviews.csv", text_column="review", validation_fraction=0.0),
                "sequence-classification", cache_dir=tmp_path / "cache")
    assert _texts(p) == texts


def write_bare_quotes(path: Path) -> list[str]:
    """A TSV written without any quoting, as `"\\t".join(fields)` writes one: quotes are text."""
    texts = [f'"{i} inches of snow, said the forecast' if i % 4 == 0 else f'row {i} a 5" screen' for i in range(12)]
    lines = ["text\tlabel"] + [f"{t}\t{('a', 'b')[i % 2]}" for i, t in enumerate(texts)]
    path.write_text("\n".join(lines) + "\n")
    return texts


def test_bare_quotes_need_quoting_none_and_the_error_says_so(cfg, tmp_path):
    texts = write_bare_quotes(tmp_path / "bare.tsv")
    spec = {"train": f"tsv:{tmp_path}/bare.tsv", "validation_fraction": 0.0}
    with pytest.raises(DataError) as e:
        prepare(cfg(**spec), "sequence-classification", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and "bare.tsv line 2" in msg and "data.quoting=none" in msg, msg
    p = prepare(cfg(**spec, quoting="none"), "sequence-classification", cache_dir=tmp_path / "cache")
    assert _texts(p) == texts
    # quoting=none on a file that needs quotes: the error names the other setting
    write_pandas_like(tmp_path / "reviews.tsv")
    with pytest.raises(DataError) as e:
        prepare(cfg(train=f"tsv:{tmp_path}/reviews.tsv", text_column="review", quoting="none"),
                "sequence-classification", cache_dir=tmp_path / "cache")
    assert "data.quoting=minimal" in str(e.value) and "reviews.tsv line" in str(e.value)


def test_the_cache_key_holds_the_quoting_option(cfg, tmp_path):
    """A file whose quotes parse either way: each setting gets its own cached dataset."""
    (tmp_path / "q.tsv").write_text('text\tlabel\n"quoted text"\ta\nplain\tb\n')
    spec = {"train": f"tsv:{tmp_path}/q.tsv", "validation_fraction": 0.0, "deduplicate": False}
    minimal = prepare(cfg(**spec), "sequence-classification", cache_dir=tmp_path / "cache")
    none = prepare(cfg(**spec, quoting="none"), "sequence-classification", cache_dir=tmp_path / "cache")
    assert minimal.location != none.location
    assert _texts(minimal)[0] == "quoted text" and _texts(none)[0] == '"quoted text"'  # as pandas / as written
    again = prepare(cfg(**spec), "sequence-classification", cache_dir=tmp_path / "cache")
    assert again.location == minimal.location


def test_a_quoting_value_outside_the_choices_is_a_recipe_error(tmp_path):
    from jaxtune.config import load_recipe
    from jaxtune.errors import ConfigError

    (tmp_path / "r.yaml").write_text("task: sequence-classification\nmodel: {path: x}\ndata: {quoting: all}\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert "data.quoting" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Files the OS will not give us (tests run as root: permissions are tested in
# tests/test_input_failures.py as another user)


def test_special_files_are_refused_before_reading(tmp_path):
    os.mkfifo(tmp_path / "pipe.csv")  # reading would wait for a writer forever
    with pytest.raises(DataError) as e:
        parse_spec(f"csv:{tmp_path}/pipe.csv")
    assert str(e.value) == f"data.train: {tmp_path}/pipe.csv is not a regular file (a named pipe); give a saved file"
    with pytest.raises(DataError) as e:
        parse_spec("csv:/dev/zero", "test")  # would never end
    assert "data.test: /dev/zero is not a regular file (a character device)" in str(e.value)


def test_an_io_error_names_the_file_and_the_reason(cfg, tmp_path):
    with pytest.raises(DataError) as e:  # a regular file whose read fails with EIO
        prepare(cfg(train="csv:/proc/self/mem"), "sequence-classification", cache_dir=tmp_path / "cache")
    assert str(e.value) == "cannot read /proc/self/mem: Input/output error"


def test_an_unwritable_cache_is_one_line(cfg, tmp_path, numbered_csv):
    numbered_csv(20)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError) as e:
        prepare(cfg(train=f"csv:{tmp_path}/train.csv"), "sequence-classification", cache_dir=tmp_path / "file" / "c")
    assert str(e.value) == (f"cannot write the data cache {tmp_path}/file/c/local: Not a directory "
                            "(set data.cache_dir to a writable folder)")
