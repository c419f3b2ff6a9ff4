"""The source/target TSV files the seq2seq tools write and read (a `source<TAB>target` header, one
pair per line), as the recipes read them with `tsv:` and `data.source_column` / `target_column`."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable


def write_pairs(path: Path, pairs: Iterable[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["source", "target"])
        w.writerows(pairs)


def read_split(path: Path) -> tuple[list[str], list[str]]:
    """The sources and the targets of a file `write_pairs` wrote."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [r["source"] for r in rows], [r["target"] for r in rows]
