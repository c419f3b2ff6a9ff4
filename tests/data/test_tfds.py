"""Named TFDS datasets through tfds.data_source, served offline by tfds.testing.mock_data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxtune.data import DataError, build_data, prepare


@pytest.fixture
def mock():
    with tfds.testing.mock_data(num_examples=40):
        yield


def test_imdb_reviews(mock, cfg, tokenizer, tmp_path):
    c = cfg(train="tfds:imdb_reviews", test="tfds:imdb_reviews:test", max_length=32, deduplicate=False)
    data = build_data(c, "sequence-classification", tokenizer=tokenizer, batch_size=8, shard_index=0,
                      shard_count=1, cache_dir=tmp_path)
    assert data.label_names == ["neg", "pos"] and data.problem_type == "single_label_classification"
    assert data.num_examples == {"train": 36, "validation": 4, "test": 40}  # validation held out of train
    train = data.splits["train"]
    labels = np.array([train.source[i]["label"] for i in range(len(train.source))])
    held = np.bincount(labels[data.splits["validation"].indices], minlength=2)
    assert (np.abs(held - 4 * np.bincount(labels, minlength=2) / 40) < 1).all()  # stratified
    assert not set(train.indices) & set(data.splits["validation"].indices)
    b = next(data.train_iterator())
    assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] in data.buckets
    assert b["labels"].dtype == np.int32 and set(b["labels"]) <= {0, 1}
    first = train[0]
    assert isinstance(first["text"], str) and first["label"] in (0, 1)
    test_batches = list(data.eval_batches("test"))
    assert len(test_batches) == 5 and sum(b["weights"].sum() for b in test_batches) == 40


def test_mnist(mock, cfg, tmp_path):
    c = cfg(train="tfds:mnist", validation="tfds:mnist:test")
    data = build_data(c, "image-classification", image_processor={"size": 14, "mean": [0.5], "std": [0.5]},
                      batch_size=8, eval_batch_size=16, shard_index=0, shard_count=1, cache_dir=tmp_path)
    assert data.label_names == [str(i) for i in range(10)]
    assert data.num_examples == {"train": 40, "validation": 40}  # images: no dedup, nothing held out
    b = next(data.train_iterator())
    assert b["pixel_values"].shape == (8, 1, 14, 14) and b["labels"].dtype == np.int32
    v = next(data.eval_batches("validation"))
    assert v["pixel_values"].shape == (16, 1, 14, 14)
    img = data.splits["validation"][0]["image"]
    assert img.shape == (28, 28, 1) and img.dtype == np.uint8
    assert -1.0 <= v["pixel_values"].min() and v["pixel_values"].max() <= 1.0


def test_tfds_dedup_and_errors(mock, cfg, tokenizer, tmp_path):
    # mock_data serves the same examples for every split: all of test duplicates train
    c = cfg(train="tfds:imdb_reviews", test="tfds:imdb_reviews:test")
    with pytest.raises(DataError, match="every example duplicates one of an earlier split"):
        build_data(c, "sequence-classification", tokenizer=tokenizer, batch_size=8, shard_index=0,
                   shard_count=1, cache_dir=tmp_path)
    with pytest.raises(DataError) as e:
        build_data(cfg(train="tfds:imdb_reviews", text_column="review"), "sequence-classification",
                   tokenizer=tokenizer, batch_size=8, shard_index=0, shard_count=1, cache_dir=tmp_path)
    assert str(e.value) == "tfds:imdb_reviews: no feature 'review' (data.text_column); features found: text, label"
    with pytest.raises(DataError, match="no such TFDS dataset"):
        build_data(cfg(train="tfds:imdb_reviewz"), "sequence-classification", tokenizer=tokenizer, batch_size=8,
                   shard_index=0, shard_count=1, cache_dir=tmp_path)


def test_glue_text_pairs_and_conll_tags(mock, cfg, tokenizer, tmp_path):
    pairs = build_data(cfg(train="tfds:glue/mrpc", validation="tfds:glue/mrpc:validation", text_column="sentence1",
                           text_pair_column="sentence2", deduplicate=False), "sequence-classification",
                       tokenizer=tokenizer, batch_size=4, shard_index=0, shard_count=1, cache_dir=tmp_path)
    assert pairs.label_names == ["not_equivalent", "equivalent"]  # the dataset's ClassLabel order
    b = next(pairs.train_iterator())
    assert b["token_type_ids"].max() == 1
    ner = build_data(cfg(train="tfds:conll2003", text_column="tokens", label_column="ner"), "token-classification",
                     tokenizer=tokenizer, batch_size=4, shard_index=0, shard_count=1, cache_dir=tmp_path)
    assert ner.label_names[:3] == ["O", "B-PER", "I-PER"] and ner.num_examples == {"train": 36, "validation": 4}
    b = next(ner.eval_batches("validation"))
    ex = ner.splits["validation"][0]
    first_tags = b["labels"][0][b["labels"][0] != -100]
    n = len(first_tags)  # words that survived truncation to max_length
    np.testing.assert_array_equal(first_tags, ex["tags"][:n])


def test_unprepared_dataset_is_a_clear_error(cfg, tmp_path):
    with pytest.raises(DataError) as e:
        prepare(cfg(train="tfds:imdb_reviews", data_dir=str(tmp_path / "empty")), "sequence-classification",
                cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("tfds:imdb_reviews:train: not prepared in ") and "tfds build" in msg
