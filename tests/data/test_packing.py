"""data.pack for causal-lm: packed rows from the pipeline (layout, coverage, resume, shards) and
their loss, which equals the token-weighted loss of the same examples unpacked (tiny GPT-2)."""

from __future__ import annotations

from collections import Counter

import jax
import numpy as np
import pytest

from jaxtune.data import build_data, load_tokenizer
from jaxtune.data.packing import first_fit
from jaxtune.errors import ConfigError
from jaxtune.models import from_pretrained, split
from jaxtune.tasks import evaluate, get_task, make_eval_fn, model_inputs
from jaxtune.tasks.causal_lm import pack_examples

import _tiny_lm as tl

LENGTH = 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    a = tl.make_assets(tmp_path_factory.mktemp("lm"))
    return {**a, "tok": load_tokenizer(str(a["model"])), "cache": tmp_path_factory.mktemp("cache")}


def lm_data(assets, cfg, pack=True, pairs=True, **kw):
    columns = {"prompt_column": "prompt", "response_column": "response"} if pairs else {"text_column": "text"}
    c = cfg(train=f"jsonl:{assets['train']}", validation=f"jsonl:{assets['val']}", max_length=LENGTH, pack=pack,
            **columns)
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    return build_data(c, "causal-lm", tokenizer=assets["tok"], batch_size=kw.pop("batch_size", 4),
                      eval_batch_size=kw.pop("eval_batch_size", 4), seed=3, cache_dir=assets["cache"], **kw)


def segments(batch) -> list[tuple]:
    """(ids, labels) of every example in the weight-1 rows, read back from segment_ids."""
    out = []
    for r in np.flatnonzero(batch["weights"] == 1):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            at = seg == s
            pos = batch["position_ids"][r][at]
            where = np.flatnonzero(at)  # one contiguous run, positions 0, 1, ...
            assert np.array_equal(pos, np.arange(at.sum())) and (where == where[0] + pos).all()
            out.append((tuple(batch["input_ids"][r][at]), tuple(batch["labels"][r][at])))
        assert (batch["attention_mask"][r] == (seg > 0)).all()
        assert (batch["labels"][r][seg == 0] == -100).all()
    return out


def encoded(data, split) -> list[tuple]:
    src = data.splits[split]
    return [(tuple(ids), tuple(labels)) for ids, _, labels in data.encoder.encode(src.get_many(range(len(src))))]


def test_first_fit_matches_pack_examples():
    lengths = np.random.default_rng(0).integers(1, 20, 200)
    rows = first_fit(lengths, 24)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 24 for r in rows)
    packed = pack_examples([{"input_ids": np.full(n, i + 1)} for i, n in enumerate(lengths)], 24)
    want = [[int(v) - 1 for v in dict.fromkeys(row[row > 0])] for row in packed["input_ids"]]
    assert rows == want


@pytest.mark.parametrize("pairs", [True, False], ids=["pairs", "text"])
def test_packed_rows_hold_every_example_once(assets, cfg, pairs):
    data = lm_data(assets, cfg, pairs=pairs)
    layout = data.layout("train")
    assert data.buckets == (LENGTH,) and data.num_examples == {"train": 80, "validation": 20}
    assert data.steps_per_epoch == -(-layout.rows // 4) and layout.rows < 80 // 2  # >= 2 examples a row
    assert f"into {layout.rows} rows of {LENGTH} tokens" in data.summary()
    # Train: one epoch of rows holds each example once, exactly as the unpacked encoder makes it.
    it = data.train_iterator()
    epoch = []
    for _ in range(data.steps_per_epoch):
        b = next(it)
        assert set(b) == {"input_ids", "attention_mask", "labels", "segment_ids", "position_ids", "weights"}
        assert all(v.shape[:2] == (4, LENGTH) and v.dtype == np.int32 for k, v in b.items() if k != "weights")
        epoch += segments(b)
    assert Counter(epoch) == Counter(encoded(data, "train"))
    if pairs:  # prompt tokens carry no loss: the first label of each example is -100
        assert all(lab[0] == -100 for _, lab in epoch) and all(lab[-1] != -100 for _, lab in epoch)
    else:
        assert all(ids[1:] == lab[1:] for ids, lab in epoch)
    # Eval: the split's rows, each example once, filler rows weigh 0.
    batches = list(data.eval_batches("validation"))
    assert len(batches) == data.eval_steps("validation") == -(-data.layout("validation").rows // 4)
    got = [s for b in batches for s in segments(b)]
    members = data.layout("validation").members  # first fit in split order: a short example can
    assert sorted(members) == list(range(20)) and list(members) != list(range(20))  # fill an earlier row
    assert got == [encoded(data, "validation")[i] for i in members]
    assert sum(b["weights"].sum() for b in batches) == data.layout("validation").rows


def test_packed_loss_equals_unpacked_token_weighted_loss(assets, cfg):
    model = from_pretrained(assets["model"])
    task = get_task("causal-lm", model.config)
    eval_step = jax.jit(make_eval_fn(model))
    params = split(model)[1]
    packed, plain = lm_data(assets, cfg), lm_data(assets, cfg, pack=False)
    a = evaluate(eval_step, params, packed.eval_batches("validation"), task)
    b = evaluate(eval_step, params, plain.eval_batches("validation"), task)
    assert a["tokens"] == b["tokens"] > 20
    for k in ("loss", "perplexity", "accuracy"):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    # One packed train batch: its loss is the token-weighted mean of its examples' own losses,
    # each example alone in a right-padded row.
    forward = jax.jit(lambda x: model(**model_inputs(x)).logits)
    batch = next(packed.train_iterator())
    loss = float(task.loss(forward(batch), batch)[0])
    exs = segments(batch)
    shape = (len(exs), LENGTH)
    alone = {"input_ids": np.zeros(shape, np.int32), "attention_mask": np.zeros(shape, np.int32),
             "labels": np.full(shape, -100, np.int32)}
    for i, (ids, labels) in enumerate(exs):
        alone["input_ids"][i, :len(ids)], alone["labels"][i, :len(ids)] = ids, labels
        alone["attention_mask"][i, :len(ids)] = 1
    logits = forward(alone)
    losses = [float(task.loss(logits[i:i + 1], {"labels": alone["labels"][i:i + 1]})[0]) for i in range(len(exs))]
    counts = [int((np.array(labels[1:]) != -100).sum()) for _, labels in exs]
    assert len(exs) > 4 and loss == pytest.approx(np.dot(losses, counts) / np.sum(counts), abs=1e-5)
    assert abs(loss - np.mean(losses)) > 1e-4  # token-weighted, not a plain mean: the check can fail


def test_packed_iterator_resumes_and_shards(assets, cfg):
    data = lm_data(assets, cfg)
    it = data.train_iterator()
    for _ in range(data.steps_per_epoch + 1):  # into the second epoch (rows reshuffled)
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = lm_data(assets, cfg).train_iterator()  # a new Data: the layout is recomputed, identically
    again.set_state(state)
    for w in want:
        g = next(again)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])
    halves = [lm_data(assets, cfg, shard_index=i, shard_count=2).train_iterator() for i in range(2)]
    whole = lm_data(assets, cfg).train_iterator()
    for _ in range(2):
        g, x, y = next(whole), next(halves[0]), next(halves[1])
        for k in g:
            np.testing.assert_array_equal(np.concatenate([x[k], y[k]]), g[k])


def test_pack_is_for_causal_lm_only(assets, cfg, tmp_path):
    (tmp_path / "t.csv").write_text("text,label\na b,x\nc d,y\n")
    with pytest.raises(ConfigError, match="data.pack packs causal-lm examples; .*sequence-classification"):
        build_data(cfg(train=f"csv:{tmp_path}/t.csv", pack=True), "sequence-classification", tokenizer=assets["tok"],
                   batch_size=2, shard_index=0, shard_count=1, cache_dir=tmp_path / "cache")
