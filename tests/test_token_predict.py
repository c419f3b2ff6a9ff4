"""`jaxtune predict` for token classification: a tag per whitespace-separated word (its first
sub-token's), equal to transformers' (PyTorch) argmax on a tiny random BERT token classifier."""

from __future__ import annotations

import pytest

import _tiny_run as tr

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "john", "live", "in", "paris", "the", "city", "big",
         "##s", "##ger"]
TAGS = {0: "O", 1: "B-PER", 2: "B-LOC"}
TEXTS = ["john lives in paris", "the  bigger citys   in paris", "nowhere"]


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tagger")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)
    tok.save_pretrained(str(folder))
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, id2label=TAGS, label2id={v: k for k, v in TAGS.items()})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
        # Centre each tag's logits over the test words, so that the argmax varies from word to word.
        enc = tok([t.split() for t in TEXTS], is_split_into_words=True, padding=True, return_tensors="pt")
        logits = model(**enc).logits[enc["attention_mask"] == 1]
        model.classifier.bias.sub_(logits.mean(0))
    model.save_pretrained(str(folder))
    return folder, tok, model


def torch_tags(tok, model, text, last=False):
    """transformers' tag of each word's first (`last`: last) sub-token."""
    import torch

    words = text.split()
    enc = tok(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits[0].argmax(-1).tolist()
    tags, seen = [None] * len(words), set()
    for t, w in enumerate(enc.word_ids(0)):
        if w is not None and (last or w not in seen):
            seen.add(w)
            tags[w] = TAGS[pred[t]]
    return tags


def test_each_word_gets_its_first_sub_tokens_tag(tagger):
    from jaxtune.inference import load, predict
    from jaxtune.tasks import get_task

    format_tags = get_task("token-classification").format

    folder, tok, model = tagger
    loaded = load(folder)
    assert loaded.task == "token-classification"
    results = predict(loaded, TEXTS)
    assert tok.tokenize("lives bigger citys") == ["live", "##s", "big", "##ger", "city", "##s"]
    for text, r in zip(TEXTS, results):
        assert r["input"] == text and r["words"] == text.split()
        assert r["tags"] == torch_tags(tok, model, text)
        assert all(0 < s <= 1 for s in r["scores"])
    assert len({t for r in results for t in r["tags"]}) > 1  # not one tag everywhere: the test can fail
    assert torch_tags(tok, model, TEXTS[1], last=True) != results[1]["tags"]  # 'bigger': big/B-LOC ##ger/O
    assert format_tags(results[0]) == " ".join(f"{w}/{t}" for w, t in zip(results[0]["words"], results[0]["tags"]))
    # Past the model's 16 positions: those words have no tag, shown as word/?
    long = predict(loaded, [" ".join(["john"] * 20)])[0]
    assert long["tags"][:14] == torch_tags(tok, model, " ".join(["john"] * 14)) and long["tags"][14:] == [None] * 6
    assert format_tags(long).endswith("john/?")


def test_cli_prints_word_tags_and_refuses_generation_options(tagger):
    from jaxtune.inference import load, predict
    from jaxtune.tasks import get_task

    format_tags = get_task("token-classification").format

    folder = tagger[0]
    proc = tr.cli("predict", folder, TEXTS[0], TEXTS[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = [format_tags(r) for r in predict(load(folder), TEXTS[:2])]
    assert proc.stdout.splitlines() == want
    bad = tr.cli("predict", folder, TEXTS[0], "--max-new-tokens", 5)
    assert bad.returncode == 2 and "generation options apply to causal-lm models" in bad.stderr
    assert "token-classification model" in bad.stderr and "Traceback" not in bad.stderr
