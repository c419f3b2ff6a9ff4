"""Local files end to end: csv / tsv / jsonl / image folder / IDX -> cached array_record -> batches."""

import gzip
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from jaxtune.data import DataError, build_data, local, prepare


def _build(cfg_changes, cfg, tmp_path, task="sequence-classification", **kw):
    kw.setdefault("batch_size", 8)
    return build_data(cfg(**cfg_changes), task, shard_index=0, shard_count=1, cache_dir=tmp_path / "cache", **kw)


def test_csv_text_classification_contract(cfg, tmp_path, numbered_csv, tokenizer):
    numbered_csv(60)
    data = _build({"train": f"csv:{tmp_path}/train.csv", "max_length": 64, "validation_fraction": 0.2,
                   "test_fraction": 0.1}, cfg, tmp_path, tokenizer=tokenizer, eval_batch_size=16)
    assert data.label_names == ["bird", "cat", "dog"] and data.num_labels == 3
    assert data.id2label == {0: "bird", 1: "cat", 2: "dog"}
    assert data.num_examples == {"train": 42, "validation": 12, "test": 6}
    assert data.steps_per_epoch == 6 and data.buckets == (16, 32, 64)
    b = next(data.train_iterator())
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels", "weights"}
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert b[k].dtype == np.int32 and b[k].shape[0] == 8 and b[k].shape[1] in data.buckets
    assert b["labels"].dtype == np.int32 and b["labels"].shape == (8,)
    assert b["weights"].dtype == np.float32 and b["weights"].tolist() == [1.0] * 8
    # attention_mask marks exactly the tokens; padding uses the pad id
    lengths = b["attention_mask"].sum(1)
    assert (b["input_ids"][np.arange(8), lengths - 1] == tokenizer.sep_token_id).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    # the labels are the ones of the texts
    texts = tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)
    names = {int(t.split()[1]): ("cat", "dog", "bird")[int(t.split()[1]) % 3] for t in texts}
    assert [data.label_names[i] for i in b["labels"]] == [names[int(t.split()[1])] for t in texts]
    assert "held out from train" in data.summary()


def test_tsv_text_pairs_give_token_type_ids(cfg, tmp_path, tokenizer):
    rows = [[f"premise {i}", f"hypothesis number {i}", str(i % 2)] for i in range(20)]
    rows[3][0] = 'a "quoted" premise'  # quotes inside a field are text (as in pandas)
    (tmp_path / "p.tsv").write_text("\n".join("\t".join(r) for r in [["s1", "s2", "y"], *rows]) + "\n")
    data = _build({"train": f"tsv:{tmp_path}/p.tsv", "text_column": "s1", "text_pair_column": "s2",
                   "label_column": "y", "validation_fraction": 0.0}, cfg, tmp_path, tokenizer=tokenizer,
                  eval_batch_size=20)
    assert data.label_names == ["0", "1"]
    b = next(data.eval_batches("train"))
    tt, mask = b["token_type_ids"], b["attention_mask"]
    assert tt.max() == 1 and (tt[mask == 0] == 0).all()
    assert tokenizer.decode(b["input_ids"][3][tt[3] == 0], skip_special_tokens=True) == 'a " quoted " premise'


def test_jsonl_multi_label_and_regression(cfg, tmp_path, tokenizer):
    rows = [{"text": f"t {i}", "tags": [["x"], ["y", "z"], [], ["z", "x"]][i % 4], "score": i / 10} for i in range(12)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = _build({"train": f"jsonl:{tmp_path}/m.jsonl", "label_column": "tags", "validation_fraction": 0.0},
                  cfg, tmp_path, tokenizer=tokenizer, eval_batch_size=12)
    assert data.problem_type == "multi_label_classification" and data.label_names == ["x", "y", "z"]
    b = next(data.eval_batches("train"))
    assert b["labels"].dtype == np.float32 and b["labels"].shape == (12, 3)
    np.testing.assert_array_equal(b["labels"][:4], [[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 1]])
    reg = _build({"train": f"jsonl:{tmp_path}/m.jsonl", "label_column": "score", "validation_fraction": 0.0},
                 cfg, tmp_path, tokenizer=tokenizer, eval_batch_size=12, problem_type="regression")
    b = next(reg.eval_batches("train"))
    assert reg.num_labels == 1 and b["labels"].dtype == np.float32
    np.testing.assert_allclose(b["labels"], np.arange(12) / 10)


def test_token_classification_labels_first_subtoken(cfg, tmp_path, tokenizer):
    rows = [{"words": ["Jaxtune", "runs", "in", "Zurich"], "ner": ["B-ORG", "O", "O", "B-LOC"]},
            {"words": ["Hello"], "ner": ["O"]}]
    (tmp_path / "ner.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = _build({"train": f"jsonl:{tmp_path}/ner.jsonl", "text_column": "words", "label_column": "ner",
                   "validation_fraction": 0.0}, cfg, tmp_path, "token-classification", tokenizer=tokenizer,
                  batch_size=2)
    assert data.label_names == ["B-LOC", "B-ORG", "O"]
    b = next(data.eval_batches("train"))
    assert b["labels"].shape == b["input_ids"].shape and b["labels"].dtype == np.int32
    enc = tokenizer(rows[0]["words"], is_split_into_words=True)
    want, prev = [], None
    for w in enc.word_ids():
        want.append(-100 if w is None or w == prev else data.label_names.index(rows[0]["ner"][w]))
        prev = w
    assert len(enc["input_ids"]) > 6  # 'Jaxtune' splits into sub-tokens: the test means something
    np.testing.assert_array_equal(b["labels"][0, : len(want)], want)
    assert (b["labels"][0, len(want):] == -100).all()


def test_causal_lm_masks_prompt_and_padding(cfg, tmp_path, tokenizer):
    rows = [{"q": "what is two plus two", "a": "four"}, {"q": "say hi", "a": "hello there friend"},
            {"q": None, "a": "no prompt at all"}, {"q": "no answer", "a": ""}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = _build({"train": f"jsonl:{tmp_path}/qa.jsonl", "prompt_column": "q", "response_column": "a",
                   "validation_fraction": 0.0, "max_length": 32}, cfg, tmp_path, "causal-lm",
                  tokenizer=tokenizer, batch_size=3)
    assert data.num_examples == {"train": 3} and data.report[0].dropped == {"empty text": 1}
    b = next(data.eval_batches("train"))
    assert set(b) == {"input_ids", "attention_mask", "labels", "weights"}
    assert (b["labels"][2][b["attention_mask"][2] == 1] != -100).all()  # no prompt: loss on every token
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    prompt = tokenizer(rows[0]["q"])["input_ids"]
    response = tokenizer(rows[0]["a"], add_special_tokens=False)["input_ids"]
    assert (labels[0, : len(prompt)] == -100).all()
    np.testing.assert_array_equal(labels[0, len(prompt): len(prompt) + len(response)], response)
    assert (labels[mask == 0] == -100).all()
    np.testing.assert_array_equal(labels[mask == 1][labels[mask == 1] != -100], ids[mask == 1][labels[mask == 1] != -100])


def _png_folder(root, sizes=((12, 10), (9, 14))):
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("cat", "dog", "emu")):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            h, w = sizes[i % 2]
            mode = "L" if i == 5 else "RGB"
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(root / cls / f"{i}.png")


def test_image_folder(cfg, tmp_path):
    _png_folder(tmp_path / "imgs")
    settings = {"size": {"height": 8, "width": 8}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    data = _build({"train": f"images:{tmp_path}/imgs", "validation_fraction": 1 / 3, "split_seed": 1},
                  cfg, tmp_path, "image-classification", image_processor=settings, batch_size=4, seed=5)
    assert data.label_names == ["cat", "dog", "emu"] and data.num_examples == {"train": 12, "validation": 6}
    b = next(data.eval_batches("validation"))
    assert b["pixel_values"].shape == (4, 3, 8, 8) and b["pixel_values"].dtype == np.float32
    assert b["labels"].dtype == np.int32 and b["weights"].tolist() == [1, 1, 1, 1]
    assert -2.0 <= b["pixel_values"].min() and b["pixel_values"].max() <= 2.0  # (x - .5) / .25 on [0, 1]
    # eval: a plain resize of the file, no augmentation
    rec = data.splits["validation"][0]
    im = Image.open(__import__("io").BytesIO(rec["image"])).convert("RGB").resize((8, 8), Image.BILINEAR)
    np.testing.assert_allclose(b["pixel_values"][0], (np.asarray(im, np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.25, atol=1e-6)
    # train: seeded augmentation, the same on a second iterator, different from eval
    t1, t2 = next(data.train_iterator()), next(data.train_iterator())
    np.testing.assert_array_equal(t1["pixel_values"], t2["pixel_values"])
    assert t1["pixel_values"].shape == (4, 3, 8, 8)
    plain = _build({"train": f"images:{tmp_path}/imgs", "validation_fraction": 1 / 3, "split_seed": 1,
                    "augment": False}, cfg, tmp_path, "image-classification", image_processor=settings,
                   batch_size=4, seed=5)
    t0 = next(plain.train_iterator())
    np.testing.assert_array_equal(t0["labels"], t1["labels"])  # same examples, same order
    assert not np.allclose(t0["pixel_values"], t1["pixel_values"])  # cropped / flipped
    # Two processes draw the same crops for their rows as one process does for the whole batch.
    halves = [next(build_data(data.cfg, "image-classification", image_processor=settings, batch_size=4, seed=5,
                              shard_index=i, shard_count=2, cache_dir=tmp_path / "cache").train_iterator())
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["pixel_values"] for h in halves]), t1["pixel_values"])


FASHION = "/usr/share/datasets/fashion-mnist"


def test_real_fashion_mnist_idx(cfg, tmp_path):
    # A missing file fails (not skips) the test: .ci/run installs the Debian package.
    assert os.path.exists(f"{FASHION}/t10k-images-idx3-ubyte.gz"), \
        f"{FASHION} is missing: apt-get install dataset-fashion-mnist"
    data = _build({"train": f"idx:{FASHION}/t10k-images-idx3-ubyte.gz"}, cfg, tmp_path, "image-classification",
                  batch_size=50)
    assert data.num_examples == {"train": 9000, "validation": 1000}
    val = data.splits["validation"]
    assert np.bincount([e["label"] for e in val.get_many(range(1000))]).tolist() == [100] * 10  # stratified
    b = next(data.train_iterator())
    assert b["pixel_values"].shape == (50, 1, 28, 28) and 0.1 < b["pixel_values"].mean() < 0.6


def _idx(a: np.ndarray) -> bytes:
    return b"\0\0\x08" + bytes([a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def test_idx_files(cfg, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 6, 5), dtype=np.uint8)
    labels = (np.arange(30) % 3).astype(np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(labels))
    data = _build({"train": f"idx:{tmp_path}/train-images-idx3-ubyte.gz,{tmp_path}/train-labels-idx1-ubyte",
                   "labels": ["zero", "one", "two"], "validation_fraction": 0.2}, cfg, tmp_path,
                  "image-classification", batch_size=6)
    assert data.label_names == ["zero", "one", "two"] and data.num_examples == {"train": 24, "validation": 6}
    assert np.bincount([data.splits["validation"][i]["label"] for i in range(6)]).tolist() == [2, 2, 2]
    b = next(data.eval_batches("validation"))
    assert b["pixel_values"].shape == (6, 1, 6, 5)  # grayscale, own size, values on [0, 1]
    src = data.splits["validation"]
    for j in range(6):
        k = [n for n in range(30) if np.array_equal(images[n], src[j]["image"][..., 0])][0]
        np.testing.assert_allclose(b["pixel_values"][j, 0], images[k] / 255, atol=1e-6)
        assert b["labels"][j] == labels[k]
    with pytest.raises(DataError) as e:
        (tmp_path / "few-labels").write_bytes(_idx(labels[:10]))
        _build({"train": f"idx:{tmp_path}/train-images-idx3-ubyte.gz,{tmp_path}/few-labels"}, cfg, tmp_path,
               "image-classification")
    assert "30 images but" in str(e.value) and "10 labels" in str(e.value)


def test_dedup_across_and_within_splits(cfg, tmp_path, write_csv):
    write_csv(tmp_path / "tr.csv", ["text", "label"], [["a", "x"], ["b", "y"], ["a", "x"], ["b", "x"], ["c", "y"]])
    write_csv(tmp_path / "va.csv", ["text", "label"], [["a", "x"], ["d", "y"], ["d", "y"]])
    p = prepare(cfg(train=f"csv:{tmp_path}/tr.csv", validation=f"csv:{tmp_path}/va.csv"),
                "sequence-classification", cache_dir=tmp_path / "cache")
    assert len(p.splits["train"]) == 3 and len(p.splits["validation"]) == 1
    tr, va = p.report
    assert tr.dropped == {"duplicate text (same label)": 1, "duplicate text with another label (first row kept)": 1}
    assert tr.lines["duplicate text (same label)"] == [4]
    assert va.dropped == {"duplicates of a train example": 1, "duplicate text (same label)": 1}
    off = prepare(cfg(train=f"csv:{tmp_path}/tr.csv", validation=f"csv:{tmp_path}/va.csv", deduplicate=False),
                  "sequence-classification", cache_dir=tmp_path / "cache")
    assert len(off.splits["train"]) == 5 and len(off.splits["validation"]) == 3


def test_cache_is_reused_and_rebuilt_on_change(cfg, tmp_path, numbered_csv, monkeypatch):
    path = numbered_csv(30)
    c = cfg(train=f"csv:{path}")
    first = prepare(c, "sequence-classification", cache_dir=tmp_path / "cache")
    folders = sorted((tmp_path / "cache" / "local").iterdir())
    assert len(folders) == 1 and first.location == str(folders[0])
    assert folders[0].name.startswith("train-")

    calls = []
    real_build = local._build
    monkeypatch.setattr(local, "_build", lambda *a, **k: (calls.append(1), real_build(*a, **k)))
    again = prepare(c, "sequence-classification", cache_dir=tmp_path / "cache")
    assert calls == [] and again.location == first.location  # reused, nothing rebuilt

    with open(path, "a") as f:
        f.write("a brand new text,cat\n")
    changed = prepare(c, "sequence-classification", cache_dir=tmp_path / "cache")
    assert calls == [1] and changed.location != first.location
    assert sum(len(s) for s in changed.splits.values()) == 31
    option = prepare(cfg(train=f"csv:{path}", split_seed=1), "sequence-classification", cache_dir=tmp_path / "cache")
    assert calls == [1, 1] and option.location not in (first.location, changed.location)
    assert not [p for p in os.listdir(tmp_path / "cache" / "local") if p.startswith(".tmp")]


def test_causal_lm_with_bos_eos_and_no_pad_token(cfg, tmp_path):
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "b", "c", "d"])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tok.pad_token_id is None
    (tmp_path / "lm.jsonl").write_text('{"p": "a b", "r": "c d"}\n{"p": "a", "r": "b b b b b b b b b b b b"}\n')
    data = _build({"train": f"jsonl:{tmp_path}/lm.jsonl", "prompt_column": "p", "response_column": "r",
                   "validation_fraction": 0.0, "max_length": 16}, cfg, tmp_path, "causal-lm", tokenizer=tok,
                  batch_size=2)
    b = next(data.eval_batches("train"))
    assert b["input_ids"].shape == (2, 16)
    np.testing.assert_array_equal(b["input_ids"][0, :6], [1, 3, 4, 5, 6, 2])  # <s> a b c d </s>
    np.testing.assert_array_equal(b["labels"][0, :6], [-100, -100, -100, 5, 6, 2])
    assert (b["input_ids"][0, 6:] == 2).all() and (b["labels"][0, 6:] == -100).all()  # padded with eos, no loss
    assert b["attention_mask"][1].sum() == 15  # <s> a + 12 b + </s>
