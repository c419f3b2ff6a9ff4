"""Task losses against PyTorch (as transformers computes them) and split metrics against sklearn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score

import jaxtune
from jaxtune import parallel
from jaxtune.errors import JaxtuneError
from jaxtune.tasks import add_totals, evaluate, get_task, make_eval_fn, make_loss_fn, task_of
from jaxtune.tasks.base import Task
from jaxtune.train import make_eval_step

rs = np.random.RandomState(0)
B, K, T = 6, 4, 5
WEIGHTS = np.array([1, 1, 1, 1, 0, 0], np.float32)  # the last two are padding
REAL = WEIGHTS > 0


class Cfg:
    def __init__(self, num_labels, problem_type=None):
        self.num_labels, self.problem_type = num_labels, problem_type


def t(x):
    return torch.from_numpy(np.array(x))


def test_single_label_cross_entropy():
    logits = rs.normal(size=(B, K)).astype(np.float32)
    labels = rs.randint(0, K, B).astype(np.int32)
    task = get_task("sequence-classification", Cfg(K))
    loss, aux = task.loss(jnp.asarray(logits), {"labels": labels, "weights": WEIGHTS})
    want = F.cross_entropy(t(logits[REAL]), t(labels[REAL]).long())
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-6)
    acc = (logits[REAL].argmax(-1) == labels[REAL]).mean()
    np.testing.assert_allclose(float(aux["accuracy"]), acc, rtol=1e-6)
    # no weights: every example counts
    loss, _ = task.loss(jnp.asarray(logits), {"labels": labels})
    np.testing.assert_allclose(float(loss), F.cross_entropy(t(logits), t(labels).long()).item(), rtol=1e-6)


def test_multi_label_bce():
    logits = rs.normal(size=(B, K)).astype(np.float32)
    labels = (rs.rand(B, K) > 0.5).astype(np.float32)
    task = get_task("sequence-classification", Cfg(K))  # float labels: inferred multi-label
    assert task.kind(jnp.asarray(labels)) == "multi_label_classification"
    loss, _ = task.loss(jnp.asarray(logits), {"labels": labels, "weights": WEIGHTS})
    want = F.binary_cross_entropy_with_logits(t(logits[REAL]), t(labels[REAL]))
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_regression_mse(k):
    logits = rs.normal(size=(B, k)).astype(np.float32)
    labels = rs.normal(size=(B,) if k == 1 else (B, k)).astype(np.float32)
    task = get_task("sequence-classification", Cfg(k, "regression" if k > 1 else None))
    loss, _ = task.loss(jnp.asarray(logits), {"labels": labels, "weights": WEIGHTS})
    want = F.mse_loss(t(logits[REAL]).squeeze(), t(labels[REAL]).squeeze())
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-6)


def test_token_classification_ignores_minus_100_and_padding():
    logits = rs.normal(size=(B, T, K)).astype(np.float32)
    labels = rs.randint(0, K, (B, T)).astype(np.int32)
    labels[:, -2:] = -100
    labels[0, 0] = -100
    task = get_task("token-classification", Cfg(K))
    loss, aux = task.loss(jnp.asarray(logits), {"labels": labels, "weights": WEIGHTS})
    want = F.cross_entropy(t(logits[REAL]).reshape(-1, K), t(labels[REAL]).reshape(-1).long(),
                           ignore_index=-100)
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-6)
    keep = labels[REAL] != -100
    acc = (logits[REAL].argmax(-1)[keep] == labels[REAL][keep]).mean()
    np.testing.assert_allclose(float(aux["accuracy"]), acc, rtol=1e-6)


def test_all_padding_batch_has_zero_loss():
    task = get_task("sequence-classification", Cfg(K))
    loss, _ = task.loss(jnp.ones((2, K)), {"labels": np.zeros(2, np.int32), "weights": np.zeros(2, np.float32)})
    assert float(loss) == 0.0


def split_totals(task, logits, labels, batch_size):
    """Outputs summed over batches of `batch_size`; the last batch padded with weight-0 junk."""
    n = len(labels)
    pad = -n % batch_size
    junk_logits = rs.normal(size=(pad,) + logits.shape[1:]).astype(np.float32)
    junk_labels = labels[:pad] if pad else labels[:0]
    all_logits = np.concatenate([logits, junk_logits])
    all_labels = np.concatenate([labels, junk_labels])
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    totals = None
    for i in range(0, n + pad, batch_size):
        sl = slice(i, i + batch_size)
        out = task.outputs(jnp.asarray(all_logits[sl]), {"labels": all_labels[sl], "weights": weights[sl]})
        totals = add_totals(totals, out)
    return task.metrics(totals)


def test_split_metrics_single_label_match_sklearn():
    n = 23
    logits = rs.normal(size=(n, K)).astype(np.float32)
    labels = rs.randint(0, K - 1, n).astype(np.int32)  # class K-1 never a label: may be predicted
    m = split_totals(get_task("sequence-classification", Cfg(K)), logits, labels, 4)
    pred = logits.argmax(-1)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred), abs=1e-7)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro", zero_division=0), abs=1e-7)
    want = F.cross_entropy(t(logits), t(labels).long()).item()
    assert m["loss"] == pytest.approx(want, rel=1e-5)


def test_split_metrics_multi_label_and_regression():
    n = 13
    logits = rs.normal(size=(n, K)).astype(np.float32)
    labels = (rs.rand(n, K) > 0.5).astype(np.float32)
    m = split_totals(get_task("sequence-classification", Cfg(K)), logits, labels, 4)
    pred = (logits > 0).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels.astype(int), pred), abs=1e-7)
    assert m["macro_f1"] == pytest.approx(
        f1_score(labels.astype(int), pred, average="macro", zero_division=0), abs=1e-7)
    assert m["label_accuracy"] == pytest.approx((pred == labels).mean(), abs=1e-7)

    x = rs.normal(size=(n, 1)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rs.normal(size=n)).astype(np.float32)
    m = split_totals(get_task("sequence-classification", Cfg(1)), x, y, 4)
    assert m["mse"] == pytest.approx(np.mean((x[:, 0] - y) ** 2), rel=1e-5)
    assert m["mae"] == pytest.approx(np.mean(np.abs(x[:, 0] - y)), rel=1e-5)
    assert m["pearson"] == pytest.approx(np.corrcoef(x[:, 0], y)[0, 1], rel=1e-4)


def test_split_metrics_token_classification():
    n = 9
    logits = rs.normal(size=(n, T, K)).astype(np.float32)
    labels = rs.randint(0, K, (n, T)).astype(np.int32)
    labels[:, -1] = -100
    m = split_totals(get_task("token-classification", Cfg(K)), logits, labels, 4)
    keep = labels != -100
    y, p = labels[keep], logits.argmax(-1)[keep]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-7)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0), abs=1e-7)


TINY = dict(model_type="bert", vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, num_labels=3)


def test_model_loss_and_whole_split_eval_on_a_mesh():
    """A jaxtune model: training loss uses dropout (rng), eval is deterministic; metrics over a
    10-example split in batches of 4 (last one padded) equal the unbatched metrics."""
    model = jaxtune.from_config(dict(TINY), task="sequence-classification")
    assert task_of(model) == "sequence-classification"
    params = jaxtune.models.split(model)[1]
    n, length = 10, 8
    ids = rs.randint(1, 50, (n, length)).astype(np.int32)
    mask = np.ones_like(ids)
    labels = rs.randint(0, 3, n).astype(np.int32)

    loss_fn = make_loss_fn(model)
    batch = {"input_ids": ids[:4], "attention_mask": mask[:4], "labels": labels[:4]}
    l1, _ = loss_fn(params, batch, jax.random.PRNGKey(1))
    l2, _ = loss_fn(params, batch, jax.random.PRNGKey(2))
    assert float(l1) != float(l2)  # dropout (0.1 by default) follows the rng

    logits = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    plan = parallel.Plan.from_config(None, data=2, fsdp=2, tensor=2)
    state = plan.create_state(params, optax.sgd(0.0))
    eval_step = plan.jit_eval_step(make_eval_step(make_eval_fn(model)), state)
    batches = []
    for i in range(0, 12, 4):
        sl = slice(i, i + 4)
        rows = len(labels[sl])
        pad = 4 - rows
        batches.append(plan.shard_batch({
            "input_ids": np.concatenate([ids[sl], np.ones((pad, length), np.int32)]),
            "attention_mask": np.concatenate([mask[sl], np.ones((pad, length), np.int32)]),
            "labels": np.concatenate([labels[sl], np.zeros(pad, np.int32)]),
            "weights": np.concatenate([np.ones(rows, np.float32), np.zeros(pad, np.float32)]),
        }))
    m = evaluate(eval_step, state, batches, get_task("sequence-classification", model.config))
    pred = logits.argmax(-1)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred), abs=1e-7)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro", zero_division=0), abs=1e-7)
    assert m["loss"] == pytest.approx(F.cross_entropy(t(logits), t(labels).long()).item(), rel=1e-5)


def test_unknown_task_and_base_model():
    with pytest.raises(JaxtuneError, match="task 'speech-translation' has no loss yet"):
        get_task("speech-translation")
    with pytest.raises(JaxtuneError, match="not a task head"):
        task_of(jaxtune.from_config(dict(TINY), task="base"))
    with pytest.raises(JaxtuneError, match="problem_type 'bogus'"):
        get_task("sequence-classification", Cfg(2, "bogus")).loss(jnp.ones((1, 2)), {"labels": np.zeros(1, np.int32)})
    assert isinstance(get_task("token-classification"), Task)


@pytest.mark.parametrize("name, cfg, logits_shape, labels", [
    ("sequence-classification", Cfg(K), (B, K), rs.randint(0, K, B).astype(np.int32)),
    ("sequence-classification", Cfg(K, "multi_label_classification"), (B, K),
     rs.randint(0, 2, (B, K)).astype(np.float32)),
    ("sequence-classification", Cfg(1), (B, 1), rs.normal(size=B).astype(np.float32)),
    ("sequence-classification", Cfg(K, "regression"), (B, K), rs.normal(size=(B, K)).astype(np.float32)),
    ("image-classification", Cfg(K), (B, K), rs.randint(0, K, B).astype(np.int32)),
    ("token-classification", Cfg(K), (B, T, K), rs.randint(0, K, (B, T)).astype(np.int32)),
    ("causal-lm", None, (B, T, K), rs.randint(0, K, (B, T)).astype(np.int32)),
])
def test_metric_names_are_known_before_any_data_and_match_the_metrics(name, cfg, logits_shape, labels):
    """`train.metric` is checked against `metric_names()` before training; they must be exactly
    the keys a split's metrics have."""
    task = get_task(name, cfg)
    outputs = task.outputs(jnp.asarray(rs.normal(size=logits_shape).astype(np.float32)),
                           {"labels": labels, "weights": WEIGHTS})
    assert tuple(task.metrics(add_totals(None, outputs))) == task.metric_names()


def test_each_task_says_what_data_it_reads_and_what_a_model_folder_must_supply():
    from jaxtune.tasks import TASKS

    kinds = {n: (get_task(n).data_kind, get_task(n).modality) for n in TASKS}
    assert kinds == {"sequence-classification": ("text", "text"), "token-classification": ("tokens", "text"),
                     "causal-lm": ("lm", "text"), "image-classification": ("image", "image"),
                     "ctc": ("audio", "audio"), "seq2seq-lm": ("seq2seq", "text")}
    assert get_task("causal-lm").predict_options and not get_task("sequence-classification").predict_options
