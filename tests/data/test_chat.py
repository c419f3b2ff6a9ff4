"""Chat / instruction data for causal-lm (`jaxtune.data.chat`): conversations and prompt/response
pairs rendered with the tokenizer's chat template (a ChatML template on a tiny BPE), loss on the
assistant replies through their end-of-turn marker, text templates over any columns, bad rows as
one line with file and line, packing, the cache key; a `jaxtune run` / `jaxtune predict` end to end."""

from __future__ import annotations

import json
import math
import shutil

import jax
import numpy as np
import pytest
import yaml

from jaxtune.data import build_data, load_tokenizer, prepare
from jaxtune.errors import DataError
from jaxtune.runlog import read_metrics

import _tiny_chat as tc
import _tiny_run as tr

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    a = tc.make_assets(tmp_path_factory.mktemp("chat"))
    return {**a, "tok": load_tokenizer(str(a["model"])), "cache": tmp_path_factory.mktemp("cache")}


def chat_data(assets, cfg, train=None, validation=None, **options):
    tok = options.pop("tokenizer", assets["tok"])
    c = cfg(train=train or f"jsonl:{assets['train']}",
            validation=validation if validation is not None else f"jsonl:{assets['val']}",
            max_length=options.pop("max_length", 64), **options)
    return build_data(c, "causal-lm", tokenizer=tok, batch_size=4,
                      shard_index=0, shard_count=1, seed=3, cache_dir=assets["cache"])


def encode(data, split="train", i=0):
    ids, _, labels = data.encoder.encode([data.splits[split][i]])[0]
    return list(ids), list(labels)


def expected(tok, pieces):
    """(ids, labels) of text pieces (text, in the loss?) tokenized one by one and joined."""
    ids, labels = [], []
    for text, loss in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if loss else [-100] * len(t)
    return ids, labels


def test_two_assistant_turns_exact_mask(assets, cfg):
    """The loss covers exactly each reply and its <|im_end|>; not the line break after it, not the
    system/user turns, not the assistant header."""
    data = chat_data(assets, cfg, messages_column="messages")
    src = data.splits["train"]
    want_rows = [r["messages"] for r in assets["train_rows"]]
    # de-duplication and reading keep the file order: row 0 is the first conversation (with system)
    m = want_rows[0]
    assert m[0]["role"] == "system" and [x["role"] for x in m].count("assistant") == 2
    head = "".join(f"<|im_start|>{x['role']}\n{x['content']}{IM_END}\n" for x in m[:2])
    middle = f"\n<|im_start|>user\n{m[3]['content']}{IM_END}\n<|im_start|>assistant\n"
    pieces = [(head + "<|im_start|>assistant\n", False), (m[2]["content"] + IM_END, True),
              (middle, False), (m[4]["content"] + IM_END, True), ("\n", False)]
    assert src[0]["text"] == "".join(p for p, _ in pieces) == assets["tok"].apply_chat_template(m, tokenize=False)
    ids, labels = encode(data)
    want_ids, want_labels = expected(assets["tok"], pieces)
    assert ids == want_ids and labels == want_labels
    assert assets["tok"].decode([t for t in labels if t != -100]) == f"{m[2]['content']}{IM_END}{m[4]['content']}{IM_END}"
    # Batches carry the same labels (padding -100).
    b = next(iter(data.eval_batches("validation")))
    for r in range(4):
        ids, labels = encode(data, "validation", r)
        n = len(ids)
        assert list(b["labels"][r, :n]) == labels and (b["labels"][r, n:] == -100).all()


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_prompt_response_as_one_turn_chat(assets, cfg, tmp_path, mode):
    rows = [{"q": "2 plus 3 ?", "a": "five"}, {"q": "1 plus 1 ?", "a": "two"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = chat_data(assets, cfg, train=f"jsonl:{path}", validation="", validation_fraction=0.0,
                     prompt_column="q", response_column="a", chat_template=mode)
    tok = assets["tok"]
    ids, labels = encode(data)
    if mode == "auto":
        want = expected(tok, [("<|im_start|>user\n2 plus 3 ?<|im_end|>\n<|im_start|>assistant\n", False),
                              ("five" + IM_END, True), ("\n", False)])
    else:  # today's behaviour: prompt (with the tokenizer's specials) + response + EOS
        prompt = tok("2 plus 3 ?")["input_ids"]
        response = tok("five", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        want = (prompt + response, [-100] * len(prompt) + response)
    assert (ids, labels) == want


def test_templates_fill_from_any_columns(assets, cfg, tmp_path, write_csv):
    path = write_csv(tmp_path / "tweets.csv", ["id", "text", "sentiment"],
                     [[1, "what a day", "positive"], [2, "so sad", "negative"], [3, "a {brace}", "neutral"]])
    options = dict(train=f"csv:{path}", validation="", validation_fraction=0.0,
                   prompt_template="Sentiment of this tweet (negative, neutral or positive)?\n{text}",
                   response_template="{sentiment}", max_length=128)
    plain = chat_data(assets, cfg, chat_template="none", **options)
    got = [plain.splits["train"][i] for i in range(3)]
    assert [g["response"] for g in got] == ["positive", "negative", "neutral"]
    assert got[2]["prompt"] == "Sentiment of this tweet (negative, neutral or positive)?\na {brace}"
    chat = chat_data(assets, cfg, **options)
    ids, labels = encode(chat, i=1)
    want = expected(assets["tok"], [("<|im_start|>user\nSentiment of this tweet (negative, neutral or positive)?\n"
                                      "so sad<|im_end|>\n<|im_start|>assistant\n", False),
                                     ("negative" + IM_END, True), ("\n", False)])
    assert (ids, labels) == want
    # A placeholder naming no column: one line naming the template and the columns there are.
    with pytest.raises(DataError) as e:
        chat_data(assets, cfg, **{**options, "response_template": "{label}"})
    msg = str(e.value)
    assert msg == (f"{path}: data.response_template '{{label}}' names column 'label', which the file does not "
                   "have; columns found: id, text, sentiment")
    with pytest.raises(DataError, match=r"data.prompt_template: .*'\{text'"):
        chat_data(assets, cfg, **{**options, "prompt_template": "{text"})
    with pytest.raises(DataError, match="data.prompt_column and data.prompt_template both"):
        chat_data(assets, cfg, **{**options, "prompt_column": "text"})


BAD = [
    ({"messages": [{"role": "user", "content": "hi"}, {"content": "yo"}]}, "message 2 has no 'role' (keys: content)"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}, "message 1 has no 'content' (keys: role)"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "yo"}]},
     "the chat template cannot render this conversation: role tool is not system, user or assistant"),
    ({"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "yo"}]},
     "message 1 (user): content is list, not a string"),
    ({"messages": []}, "an empty conversation (no messages)"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no 'assistant' message (roles: user); nothing to learn"),
    ({"messages": "[{\"role\": "}, "messages are not valid JSON (Expecting value at column 11)"),
    ({"messages": {"role": "user"}}, "expected a list of {role, content} messages, found dict"),
]


@pytest.mark.parametrize("row, message", BAD, ids=["no-role", "no-content", "role-rejected", "content-list",
                                                   "empty", "no-assistant", "bad-json", "not-a-list"])
def test_bad_rows_are_one_line_with_file_and_line(assets, cfg, tmp_path, row, message):
    good = assets["train_rows"][:3]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good[:2] + [row] + good[2:]))
    with pytest.raises(DataError) as e:
        chat_data(assets, cfg, train=f"jsonl:{path}", validation="", messages_column="messages")
    assert str(e.value) == f"{path} line 3: {message}" and "\n" not in str(e.value)


def test_bad_rows_in_csv_and_skipping(assets, cfg, tmp_path, write_csv):
    good = [json.dumps(r["messages"]) for r in assets["train_rows"][:4]]
    path = write_csv(tmp_path / "chats.csv", ["conversation"],
                     [[good[0]], [good[1]], ['[{"role": "user", "content": "hi"}]'], [good[2]], [good[3]]])
    with pytest.raises(DataError, match=rf"^{path} line 4: no 'assistant' message"):
        chat_data(assets, cfg, train=f"csv:{path}", validation="", messages_column="conversation")
    data = chat_data(assets, cfg, train=f"csv:{path}", validation="", validation_fraction=0.0,
                     messages_column="conversation", skip_bad_rows=True)
    assert data.num_examples == {"train": 4} and "unparseable rows" in data.summary()


def test_system_prompt_heads_every_pair_and_stays_out_of_the_loss(assets, cfg, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"q": "2 plus 3 ?", "a": "five"}) + "\n")
    data = chat_data(assets, cfg, train=f"jsonl:{path}", validation="", validation_fraction=0.0,
                     prompt_column="q", response_column="a", system_prompt="you add numbers")
    want = expected(assets["tok"], [("<|im_start|>system\nyou add numbers<|im_end|>\n"
                                     "<|im_start|>user\n2 plus 3 ?<|im_end|>\n<|im_start|>assistant\n", False),
                                    ("five" + IM_END, True), ("\n", False)])
    assert encode(data) == want
    # the system prompt is part of what the cache is keyed on: another one builds other rows
    other = chat_data(assets, cfg, train=f"jsonl:{path}", validation="", validation_fraction=0.0,
                      prompt_column="q", response_column="a", system_prompt="you count")
    assert "you count" in other.splits["train"][0]["text"]
    for options, why in ((dict(messages_column="messages"), "conversations carry their own system messages"),
                         (dict(prompt_column="q", response_column="a", chat_template="none"),
                          "data.chat_template is none"),
                         (dict(), "this recipe reads plain text")):
        with pytest.raises(DataError, match=f"data.system_prompt applies to .*{why}"):
            chat_data(assets, cfg, train=f"jsonl:{path}", validation="", validation_fraction=0.0,
                      system_prompt="x", **options)


def test_options_that_do_not_go_together(assets, cfg):
    with pytest.raises(DataError, match="data.messages_column .* does not combine with data.prompt_column"):
        chat_data(assets, cfg, messages_column="messages", prompt_column="p", response_column="r")
    with pytest.raises(DataError, match="renders conversations with the tokenizer's chat template, and "
                                        "data.chat_template is none"):
        chat_data(assets, cfg, messages_column="messages", chat_template="none")


def test_not_prefix_stable_template_is_refused(assets, cfg, tmp_path):
    import copy

    tok = copy.deepcopy(assets["tok"])
    # Numbers the turns from the end: rendering a shorter conversation changes the earlier text.
    tok.chat_template = ("{% for m in messages %}{{ (messages|length - loop.index)|string + m['role'] + ':' + "
                         "m['content'] + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(DataError, match=r"train.jsonl line 1: the chat template is not prefix-stable at assistant "
                                        r"message [23]"):
        chat_data(assets, cfg, messages_column="messages", tokenizer=tok)


def test_cache_key_follows_templates(assets, cfg, tmp_path, write_csv):
    import copy

    path = write_csv(tmp_path / "t.csv", ["text", "label"], [["good", "pos"], ["bad", "neg"]])
    base = dict(train=f"csv:{path}", validation_fraction=0.0, prompt_template="Q: {text}", response_template="{label}")

    def where(tok=assets["tok"], **changes):
        return prepare(cfg(**{**base, **changes}), "causal-lm", cache_dir=assets["cache"], tokenizer=tok).location

    first = where()
    assert where() == first
    assert where(prompt_template="Q! {text}") != first
    assert where(response_template="{label}.") != first
    assert where(chat_template="none") != first
    other = copy.deepcopy(assets["tok"])
    other.chat_template = tc.CHATML.replace("'<|im_end|>' + '\n'", "'<|im_end|>' + '\n\n'")
    assert other.chat_template != assets["tok"].chat_template
    assert where(tok=other) != first
    assert where(prompt_template=None, response_template=None, prompt_column="text", response_column="label") != first


def test_packed_chat_loss_equals_unpacked(assets, cfg):
    from jaxtune.models import from_pretrained, split
    from jaxtune.tasks import evaluate, get_task, make_eval_fn

    model = from_pretrained(assets["model"])
    task = get_task("causal-lm", model.config)
    eval_step = jax.jit(make_eval_fn(model))
    params = split(model)[1]
    packed = chat_data(assets, cfg, messages_column="messages", pack=True, max_length=128)
    plain = chat_data(assets, cfg, messages_column="messages", max_length=128)
    assert packed.layout("validation").rows <= 20 // 3
    b = next(iter(packed.eval_batches("validation")))
    assert b["segment_ids"].max() >= 2
    a, p = (evaluate(eval_step, params, d.eval_batches("validation"), task) for d in (packed, plain))
    replies = sum(len(assets["tok"](m["content"] + IM_END, add_special_tokens=False)["input_ids"])
                  for r in assets["val_rows"] for m in r["messages"] if m["role"] == "assistant")
    assert a["tokens"] == p["tokens"] == replies  # every reply token and its <|im_end|> is a target
    for k in ("loss", "perplexity", "accuracy"):
        assert a[k] == pytest.approx(p[k], rel=1e-5, abs=1e-6), k


def test_cli_run_and_predict_with_the_chat_template(assets, tmp_path):
    recipe = {
        "task": "causal-lm",
        "model": {"path": str(assets["model"])},
        "data": {"train": f"jsonl:{assets['train']}", "validation": f"jsonl:{assets['val']}",
                 "messages_column": "messages", "max_length": 128, "pack": True,
                 "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3, "warmup": 2},
        "train": {"batch_size": 8, "steps": 30, "eval_every": 30, "log_every": 10, "seed": 0,
                  "metric": "loss", "metric_mode": "min"},
        "checkpoint": {"keep": 1, "keep_best": 0},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    proc = tr.cli("run", path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    lines = read_metrics(run)
    train = [m for m in lines if m["split"] == "train"]
    val = [m for m in lines if m["split"] == "validation"]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0 and val[-1]["loss"] < math.log(300) - 1.0
    # predict: the prompt becomes a user turn with the generation prompt; only the reply is printed.
    from jaxtune.inference import load
    from jaxtune.models.generate import generate

    tok = assets["tok"]
    prompt = "2 plus 3 ?"
    proc = tr.cli("predict", run, prompt, "--json", "--max-new-tokens", 6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = np.array([tok(rendered, add_special_tokens=False)["input_ids"]], np.int32)
    out = generate(load(run).model, ids, np.ones_like(ids), max_new_tokens=6)
    want = [int(t) for t in out.tokens[0, : out.lengths[0]]]
    assert got["input"] == prompt and got["tokens"] == want
    assert got["generated"] == tok.decode(want, skip_special_tokens=True) and "assistant" not in got["generated"]
    raw = tr.cli("predict", run, prompt, "--json", "--max-new-tokens", 6, "--raw")
    assert raw.returncode == 0, raw.stderr[-3000:]
    ids = np.array([tok(prompt)["input_ids"]], np.int32)
    out = generate(load(run).model, ids, np.ones_like(ids), max_new_tokens=6)
    assert json.loads(raw.stdout)["tokens"] == [int(t) for t in out.tokens[0, : out.lengths[0]]]
    # a run whose recipe has data.system_prompt: predict renders that system message first. The
    # tiny model answers EOS whatever comes before, so the proof is the prompt's length: with a
    # system message past the model's 128 positions, predict refuses the rendered prompt.
    system = " ".join(["you add numbers"] * 40)
    shutil.copytree(run, tmp_path / "run-system", ignore=shutil.ignore_patterns("tensorboard"))
    config = yaml.safe_load((tmp_path / "run-system" / "config.yaml").read_text())
    config["data"]["system_prompt"] = system
    (tmp_path / "run-system" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = tr.cli("predict", tmp_path / "run-system", prompt, "--json", "--max-new-tokens", 6)
    rendered = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                                       tokenize=False, add_generation_prompt=True)
    n = len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert n > 128 and proc.returncode == 2, (n, proc.returncode, proc.stderr[-3000:])
    assert f"error: the longest prompt has {n} tokens; the model has 128 positions" in proc.stderr
