"""The causal-LM task on GPT-2: the loss equals transformers' (shifted, -100 ignored), responses-only
labels, packing (a packed batch's loss equals the mean of the per-example losses, 1e-5), example
weights, perplexity over a whole split."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from jaxtune.errors import JaxtuneError
from jaxtune.models import from_pretrained, split
from jaxtune.tasks import evaluate, get_task, make_eval_fn, make_loss_fn, task_of
from jaxtune.tasks.causal_lm import CausalLM, pack_examples
from jaxtune.train import make_eval_step

import _tiny_gpt2_vit as tg

LENGTHS = (5, 3, 7, 2, 6, 4)  # packed into rows of 16: [5+3+7], [2+6+4]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    t = tg.Factory(tmp_path_factory)("gpt2", "causal-lm")
    model = from_pretrained(t.path)
    return t, model, split(model)[1], jax.jit(make_eval_fn(model))


def examples(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in LENGTHS:
        ids = rng.integers(3, 97, n)
        labels = ids.copy()
        labels[: n // 3] = -100  # a prompt that carries no loss (prompt/response pairs)
        out.append({"input_ids": ids, "labels": labels})
    return out


def unpacked(exs, length=8, pad=0):
    B = len(exs)
    batch = {"input_ids": np.full((B, length), pad), "attention_mask": np.zeros((B, length), np.int64),
             "labels": np.full((B, length), -100), "weights": np.ones(B, np.float32)}
    for i, e in enumerate(exs):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n], batch["labels"][i, :n] = e["input_ids"], e["labels"]
        batch["attention_mask"][i, :n] = 1
    return batch


def no_dropout(model):
    """The eval-mode loss: task.loss on deterministic logits."""
    task = get_task("causal-lm")
    return lambda batch: task.loss(model(**{k: v for k, v in batch.items() if k not in ("labels", "weights")}).logits,
                                   batch)[0]


def test_task_registered_for_the_lm_head(lm):
    _, model, *_ = lm
    assert task_of(model) == "causal-lm"
    assert isinstance(get_task("causal-lm", model.config), CausalLM)
    with pytest.raises(JaxtuneError, match="average 'sentence'"):
        CausalLM(average="sentence")


def test_loss_equals_transformers(lm):
    import torch

    t, model, *_ = lm
    batch = unpacked(examples())
    with torch.no_grad():
        ref = t.model(input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(
            batch["attention_mask"]), labels=torch.from_numpy(batch["labels"])).loss.item()
    loss = float(no_dropout(model)(batch))
    assert loss == pytest.approx(ref, abs=1e-5)
    # The prompt tokens (-100) really are left out: all-token labels give another loss.
    everything = {**batch, "labels": np.where(batch["attention_mask"] == 1, batch["input_ids"], -100)}
    assert abs(float(no_dropout(model)(everything)) - ref) > 1e-3


def test_packed_loss_equals_mean_of_per_example_losses(lm):
    _, model, *_ = lm
    exs = examples()
    packed = pack_examples(exs, length=16)
    assert packed["input_ids"].shape == (2, 16)
    np.testing.assert_array_equal(packed["segment_ids"][0], [1] * 5 + [2] * 3 + [3] * 7 + [0])
    np.testing.assert_array_equal(packed["position_ids"][1, :12], list(range(2)) + list(range(6)) + list(range(4)))

    loss_of = no_dropout(model)
    alone = [float(loss_of(unpacked([e]))) for e in exs]
    targets = [int((np.asarray(e["labels"])[1:] != -100).sum()) for e in exs]
    token_mean = float(np.dot(alone, targets) / np.sum(targets))
    packed_loss = float(loss_of(packed))
    assert packed_loss == pytest.approx(token_mean, abs=1e-5)
    assert packed_loss == pytest.approx(float(loss_of(unpacked(exs))), abs=1e-5)  # = one example per row
    # average="example": exactly the plain mean of the per-example losses, packed or not.
    by_example = CausalLM(average="example")
    logits = model(**{k: packed[k] for k in ("input_ids", "attention_mask", "segment_ids")}).logits
    assert float(by_example.loss(logits, packed)[0]) == pytest.approx(np.mean(alone), abs=1e-5)
    flat = unpacked(exs)
    logits = model(input_ids=flat["input_ids"], attention_mask=flat["attention_mask"]).logits
    assert float(by_example.loss(logits, flat)[0]) == pytest.approx(np.mean(alone), abs=1e-5)
    assert abs(np.mean(alone) - token_mean) > 1e-4  # the two averages really differ here
    # Without segment ids the same packed row is a different (wrong) computation.
    leaky = {k: v for k, v in packed.items() if k not in ("segment_ids", "position_ids")}
    assert abs(float(loss_of(leaky)) - token_mean) > 1e-3


def test_packed_batch_through_make_loss_fn(lm):
    """make_loss_fn passes segment_ids (and position_ids) to the model: with dropout off the
    training loss of a packed batch equals the per-example mean too."""
    t = lm[0]
    model = from_pretrained(t.path, config_overrides={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    params = split(model)[1]
    exs = examples(seed=1)
    packed = pack_examples(exs, length=16)
    loss, aux = jax.jit(make_loss_fn(model))(params, packed, jax.random.PRNGKey(0))
    alone = [float(no_dropout(model)(unpacked([e]))) for e in exs]
    targets = [int((np.asarray(e["labels"])[1:] != -100).sum()) for e in exs]
    assert float(loss) == pytest.approx(np.dot(alone, targets) / np.sum(targets), abs=1e-5)
    assert float(aux["tokens"]) == sum(targets)


def test_example_weights_and_perplexity_over_a_split(lm):
    """A weight-0 row changes nothing; perplexity = exp(total token loss / total target tokens)."""
    _, model, params, eval_fn = lm
    exs = examples(seed=2)
    a, b = unpacked(exs[:4]), unpacked(exs[4:] + exs[:2])
    b["weights"][-1] = 0.0  # a filler row
    step = jax.jit(make_eval_step(eval_fn))
    metrics = evaluate(step, params, [a, b], get_task("causal-lm"))
    loss_of = no_dropout(model)
    real = exs[:4] + exs[4:] + exs[:1]  # b = exs[4], exs[5], exs[0], (exs[1] weight 0)
    alone = [float(loss_of(unpacked([e]))) for e in real]
    targets = [int((np.asarray(e["labels"])[1:] != -100).sum()) for e in real]
    want = float(np.dot(alone, targets) / np.sum(targets))
    assert metrics["loss"] == pytest.approx(want, abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert metrics["tokens"] == sum(targets)
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_pack_examples_edges():
    packed = pack_examples([{"input_ids": [5] * 20}, {"input_ids": [6, 7]}, {"input_ids": []}], length=8, pad_id=1)
    np.testing.assert_array_equal(packed["input_ids"], [[5] * 8, [6, 7] + [1] * 6])  # cut to 8; empty skipped
    np.testing.assert_array_equal(packed["labels"][1], [6, 7] + [-100] * 6)
    np.testing.assert_array_equal(packed["attention_mask"][1], [1, 1] + [0] * 6)
    np.testing.assert_array_equal(packed["weights"], [1, 1])
    # First fit: a later short example fills the first row with room.
    packed = pack_examples([{"input_ids": [3] * 6}, {"input_ids": [4] * 5}, {"input_ids": [9, 9]}], length=8)
    np.testing.assert_array_equal(packed["segment_ids"], [[1] * 6 + [2] * 2, [1] * 5 + [0] * 3])
    with pytest.raises(JaxtuneError, match="need 2 rows of 8, more than 1"):
        pack_examples([{"input_ids": [3] * 6}, {"input_ids": [4] * 5}], length=8, max_rows=1)
    with pytest.raises(JaxtuneError, match="differ in length"):
        pack_examples([{"input_ids": [3, 4], "labels": [3]}], length=8)
