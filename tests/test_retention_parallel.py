"""Retention and EWC's Fisher on 8 fake CPU devices (data=2 x fsdp=2 x tensor=2): the same numbers
as one device, and the Fisher (in the optimizer state too) sharded like the params it weighs."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

import _tiny_run
from jaxtune import ewc, parallel
from jaxtune.config import load_recipe
from jaxtune.models import flatten, path_str
from jaxtune.run.build import build


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention-parallel")
    make = _tiny_run.make_assets(root)
    mlm = root / "mlm"
    mlm.mkdir()
    tok = _tiny_run.make_tokenizer(mlm)
    torch.manual_seed(2)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=32, initializer_range=0.3)
                    ).save_pretrained(str(mlm))
    ret = root / "retention.jsonl"
    ret.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                           ["the day was long and the road was green", "a very good movie", "it is seven",
                            "the food was bad", "paper on a table", "quite a happy day", "love the road"]))
    return lambda out, **mesh: make(out, name=out.name, model__path=str(mlm), data__retention=f"jsonl:{ret}",
                                    optim__ewc={"strength": 1.0, "samples": 10}, mesh=mesh)


def _measure(recipe, out):
    r = build(load_recipe(recipe(out)))
    state = r.plan.create_state(r.params, r.optimizer, param_shardings=r.param_shardings, rng=0)
    moved = state.replace(params=jax.tree.map(lambda x: x * 1.05, state.params))
    values = [r.retention.evaluate(state), r.retention.evaluate(moved)]
    state, _ = ewc.prepare(r, state)
    return r, state, values


def test_retention_and_fisher_on_8_devices_equal_one_device(recipe, tmp_path, monkeypatch):
    assert jax.device_count() == 8
    with monkeypatch.context() as m:  # the one-device reference: a mesh on the first device alone
        plain = parallel.Plan.from_config.__func__
        m.setattr(parallel.Plan, "from_config",
                  classmethod(lambda cls, config=None, **kw: plain(cls, config, devices=jax.devices()[:1], **kw)))
        one, one_state, one_values = _measure(lambda out: recipe(out, data=1, fsdp=1, tensor=1), tmp_path / "one")
    assert one.plan.mesh.size == 1
    r, state, values = _measure(lambda out: recipe(out, data=2, fsdp=2, tensor=2), tmp_path / "eight")
    assert r.retention.measure == "masked-lm" and r.plan.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    for got, want in zip(values, one_values):
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    assert values[0]["mlm_loss"] != pytest.approx(values[1]["mlm_loss"], abs=1e-4)
    (fisher,) = ewc.fisher_of(state.opt_state)
    (one_fisher,) = ewc.fisher_of(one_state.opt_state)
    held = lambda tree: {p: x for p, x in flatten(tree).items() if not isinstance(x, optax.MaskedNode)}  # noqa: E731
    want, got = held(one_fisher), held(fisher)
    assert got.keys() == want.keys() and len(got) > 10
    shardings = {p: x.sharding for p, x in flatten(state.params).items()}
    sharded = 0
    for p, x in got.items():
        np.testing.assert_allclose(np.asarray(x), np.asarray(want[p]), rtol=1e-4, atol=1e-6, err_msg=path_str(p))
        assert x.sharding == shardings[p], path_str(p)
        sharded += any(a is not None for a in x.sharding.spec)
    assert sharded > 5  # kernels are split over fsdp / tensor, not all replicated
