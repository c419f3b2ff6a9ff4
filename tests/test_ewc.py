"""EWC (`optim.ewc`, jaxtune.ewc): the penalty's optimum on a quadratic where it is known in closed
form, the sampled Fisher of a linear-Gaussian model against its analytic value, and a run whose
Fisher is estimated before the first step, checkpointed, and resumed to the same bits."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import _tiny_run
from jaxtune.config import EWCConfig, OptimConfig, load_recipe
from jaxtune.errors import ConfigError
from jaxtune.ewc import fisher_of, fisher_sums, normalize, with_fisher
from jaxtune.optim import make_optimizer
from jaxtune.run import run
from jaxtune.runlog import read_metrics


def test_penalty_reaches_the_closed_form_optimum_in_the_chain():
    """L = 1/2 |theta - a|^2 + strength/2 sum F (theta - theta0)^2 has its minimum at
    (a + strength F theta0) / (1 + strength F). Through make_optimizer's chain (plain SGD), with a
    fresh head (no pretrained value: no penalty) and a frozen parameter (partition)."""
    theta0 = {"w": jnp.array([1.0, -2.0, 0.5]), "head": jnp.array([3.0]), "frozen": jnp.array([7.0])}
    a = {"w": jnp.array([4.0, 0.0, 0.5]), "head": jnp.array([-1.0]), "frozen": jnp.array([0.0])}
    fisher = {"w": jnp.array([0.5, 2.0, 1.0]), "head": jnp.array([5.0]), "frozen": jnp.array([5.0])}
    strength = 3.0
    cfg = OptimConfig(name="sgd", momentum=0.0, lr=0.05, schedule="constant", clip_norm=None, freeze=["frozen"],
                      ewc=EWCConfig(strength=strength))
    pretrained = {"w": theta0["w"], "head": None, "frozen": theta0["frozen"]}
    tx = make_optimizer(cfg, theta0, pretrained=pretrained, total_steps=10).tx
    state = with_fisher(tx.init(theta0), fisher)
    (held,) = fisher_of(state)
    assert held["w"].tolist() == [0.5, 2.0, 1.0]
    assert isinstance(held["head"], optax.MaskedNode)  # a fresh head holds no anchor and no Fisher
    params = theta0
    grad = jax.grad(lambda p: 0.5 * sum(jnp.sum((p[k] - a[k]) ** 2) for k in p))
    step = jax.jit(lambda p, s: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(grad(p), s, p)))
    for _ in range(600):
        params, state = step(params, state)
    want = (a["w"] + strength * fisher["w"] * theta0["w"]) / (1 + strength * fisher["w"])
    np.testing.assert_allclose(params["w"], want, rtol=1e-5)
    np.testing.assert_allclose(params["head"], a["head"], rtol=1e-5)  # only the loss pulls it
    assert params["frozen"].tolist() == [7.0]


def _gaussian_log_prob(params, frozen, example, key):
    """y ~ N(x . w, 1) drawn from the model itself; log p(y | x) up to a constant."""
    mu = example["x"] @ params["w"]
    y = jax.lax.stop_gradient(mu + jax.random.normal(key, mu.shape))
    return -0.5 * jnp.sum((y - mu) ** 2)


def test_sampled_fisher_of_a_linear_gaussian_model_is_its_analytic_value():
    """For y ~ N(x . w, 1) the Fisher of w is E[x x^T], its diagonal E[x_i^2], whatever w."""
    rs = np.random.RandomState(0)
    n, scales = 4000, np.array([0.5, 1.0, 2.0, 3.0], np.float32)
    x = (rs.randn(n, 4) * scales).astype(np.float32)
    weights = np.ones(n, np.float32)
    weights[-500:] = 0.0  # weight-0 rows (a last batch's filler) must not count
    params = {"w": jnp.array([0.3, -1.0, 2.0, 0.0])}
    sums, count = jax.jit(lambda b, k: fisher_sums(_gaussian_log_prob, params, {}, b, k))(
        {"x": x, "weights": weights}, jax.random.PRNGKey(0))
    assert float(count) == 3500
    fisher = np.asarray(sums["w"]) / float(count)
    np.testing.assert_allclose(fisher, np.mean(x[:3500] ** 2, axis=0), rtol=0.1)  # Monte Carlo: ~2.4% sd
    # the same sums, one example at a time by hand: row j of a batch draws with fold_in(key, j)
    xs, ws = x[::97], weights[::97]
    sub, _ = fisher_sums(_gaussian_log_prob, params, {}, {"x": xs, "weights": ws}, jax.random.PRNGKey(0))
    g = jax.grad(_gaussian_log_prob)
    by_hand = sum(float(ws[j]) * np.asarray(g(params, {}, {"x": xs[j:j + 1]},
                                                jax.random.fold_in(jax.random.PRNGKey(0), j))["w"]) ** 2
                  for j in range(len(xs)))
    np.testing.assert_allclose(np.asarray(sub["w"]), by_hand, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(normalize({"w": sums["w"]})["w"]).mean(), 1.0, rtol=1e-6)


def test_ewc_recipe_rules(tmp_path):
    path = tmp_path / "r.yaml"
    base = {"task": "sequence-classification", "model": {"path": "x"}, "optim": {"ewc": {"strength": 1.0}}}
    path.write_text(json.dumps(base))
    with pytest.raises(ConfigError, match="optim.ewc estimates its Fisher on data.retention"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="ewc.samples must be >= 1"):
        load_recipe(path, ["data.retention=jsonl:x", "optim.ewc.samples=0"])
    with pytest.raises(ConfigError, match="optim.ewc applies to full fine-tuning"):
        load_recipe(path, ["data.retention=jsonl:x", "lora.rank=4"])


def _arrays(step_dir: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ocp.PyTreeCheckpointer().restore(step_dir / "state")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_a_run_estimates_the_fisher_first_checkpoints_it_and_resumes_to_the_same_bits(tmp_path):
    recipe = _tiny_run.make_assets(tmp_path / "assets")
    ret = tmp_path / "retention.jsonl"
    ret.write_text("".join(json.dumps({"text": f"{w} day was very long"}) + "\n"
                           for w in ("the", "a", "it", "seven", "green", "paper", "road", "table", "movie")))
    out = tmp_path / "run"
    path = recipe(out, name="ewc", data__retention=f"jsonl:{ret}", optim__ewc={"strength": 5.0, "samples": 12},
                  train__steps=8, train__eval_every=4, checkpoint__every=None, checkpoint__keep=10)
    run(load_recipe(path))
    full = _arrays(out / "checkpoints" / "8")
    fisher = {k: v for k, v in full.items() if "fisher" in k}
    assert fisher and not any("classifier" in k for k in fisher)  # the new head is not penalised
    values = np.concatenate([v.ravel() for v in fisher.values()])
    assert values.mean() == pytest.approx(1.0, rel=1e-5) and values.max() > 1.0  # scaled, not uniform
    theta0 = {k: v for k, v in full.items() if "theta0" in k}
    assert theta0 and all(np.any(v != 0) for k, v in theta0.items() if "kernel" in k)
    first = _arrays(out / "checkpoints" / "4")
    assert first.keys() == full.keys()
    for k in fisher:  # the Fisher is estimated once: every checkpoint holds the same one
        np.testing.assert_array_equal(first[k], fisher[k])
    # resume from step 4 (the later checkpoint gone): the same bits at step 8, Fisher and anchor included
    again = tmp_path / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("export", "tensorboard"))
    shutil.rmtree(again / "checkpoints" / "8")
    path2 = recipe(again, name="ewc", data__retention=f"jsonl:{ret}", optim__ewc={"strength": 5.0, "samples": 12},
                   train__steps=8, train__eval_every=4, checkpoint__every=None, checkpoint__keep=10)
    run(load_recipe(path2))
    resumed = _arrays(again / "checkpoints" / "8")
    assert resumed.keys() == full.keys()
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
    steps = [m["step"] for m in read_metrics(again) if m["split"] == "retention"]
    assert steps == [0, 4, 8]  # the pretrained reference is not logged again on resume
    uninterrupted = [m for m in read_metrics(out) if m["split"] == "retention"]
    assert [m for m in read_metrics(again) if m["split"] == "retention"] == uninterrupted
