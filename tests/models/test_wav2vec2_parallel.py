"""Wav2Vec2 CTC training on 8 fake CPU devices (data=2 x fsdp=2 x tensor=2), SpecAugment on: the
same losses and parameters as one device, every parameter and Adam moment sharded as the
logical-axis rules say (conv channels replicated by default; `mesh.rules` can split them)."""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import jaxtune
from jaxtune import parallel
from jaxtune.config import MeshConfig
from jaxtune.models import flatten, path_str
from jaxtune.tasks import make_loss_fn
from jaxtune.train import make_train_step

CONFIG = dict(model_type="wav2vec2", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=64, conv_dim=(8, 16), conv_stride=(3, 2), conv_kernel=(5, 3), conv_bias=True,
              num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=4, vocab_size=12, layerdrop=0.0,
              hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, final_dropout=0.0,
              mask_time_prob=0.3, mask_time_length=2, mask_feature_prob=0.2, mask_feature_length=4,
              ctc_loss_reduction="mean")

# embed -> fsdp; heads, mlp, vocab -> tensor; conv channels and unnamed dims replicated.
EXPECTED = [
    (r"conv_layers/\d+/conv/kernel$", P(None, None, None)),
    (r"conv_layers/\d+/(conv/bias|layer_norm/(scale|bias))$", P(None)),
    (r"feature_projection/layer_norm/(scale|bias)$", P(None)),
    (r"feature_projection/projection/kernel$", P(None, "fsdp")),
    (r"(feature_projection/projection/bias|masked_spec_embed|pos_conv_embed/conv/bias)$", P("fsdp")),
    (r"pos_conv_embed/conv/weight_v$", P(None, None, "fsdp")),
    (r"pos_conv_embed/conv/weight_g$", P(None)),
    (r"(layer_norm|final_layer_norm)/(scale|bias)$", P("fsdp")),
    (r"attention/(q|k|v)_proj/kernel$", P("fsdp", "tensor")),
    (r"attention/(q|k|v)_proj/bias$", P("tensor")),
    (r"attention/out_proj/kernel$", P("tensor", "fsdp")),
    (r"attention/out_proj/bias$", P("fsdp")),
    (r"intermediate_dense/kernel$", P("fsdp", "tensor")),
    (r"intermediate_dense/bias$", P("tensor")),
    (r"output_dense/kernel$", P("tensor", "fsdp")),
    (r"output_dense/bias$", P("fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"lm_head/bias$", P("tensor")),
]


def expected_spec(path: str) -> P:
    for pattern, spec in EXPECTED:
        if re.search(pattern, path):
            return spec
    raise AssertionError(f"no expectation for {path}")


def batches(steps: int = 2, batch: int = 8, samples: int = 400):
    rs = np.random.RandomState(0)
    out = []
    for i in range(steps):
        lengths = rs.randint(200, samples + 1, batch)
        mask = (np.arange(samples)[None] < lengths[:, None]).astype(np.int32)
        labels = np.full((batch, 10), -100, np.int32)
        for r in range(batch):
            n = rs.randint(2, 9)
            labels[r, :n] = rs.randint(1, 12, n)
        b = dict(input_values=(rs.normal(size=(batch, samples)) * mask).astype(np.float32), attention_mask=mask,
                 labels=labels, weights=np.ones(batch, np.float32))
        if i == 0:
            b["weights"][-2:] = 0.0
        out.append(b)
    return out


def train(plan, data, rules=None):
    model = jaxtune.from_config(dict(CONFIG), task="ctc", shardings=lambda m: plan.param_shardings(m))
    _, params, _ = jaxtune.models.split(model)
    tx = optax.adamw(1e-3, weight_decay=0.01)
    state = plan.create_state(params, tx, rng=0)
    step = plan.jit_train_step(make_train_step(make_loss_fn(model), tx), state)
    losses = []
    for b in data:
        state, metrics = step(state, plan.shard_batch(b))
        losses.append(float(metrics["loss"]))  # one step in flight on CPU (see jaxtune.parallel)
    return state, losses


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_sharded_ctc_training_matches_one_device():
    data = batches()
    one = parallel.Plan.from_config(None, devices=jax.devices()[:1], data=1)
    ref_state, ref_losses = train(one, data)
    plan = parallel.Plan.from_config(MeshConfig(data=2, fsdp=2, tensor=2))
    state, losses = train(plan, data)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[0] != losses[-1]
    got, want = flatten(host(state.params)), flatten(host(ref_state.params))
    for path in want:
        if re.search(r"k_proj/bias$|conv_layers/0/conv/bias$", path_str(path)):
            # zero true gradients (a constant per query under softmax; a per-channel constant the
            # group norm subtracts): Adam turns their float noise into lr-sized steps
            continue
        # atol: Adam turns float noise in a near-zero gradient into up to ~1% of an lr-sized step
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=3e-5, err_msg=path_str(path))
    for path, x in flatten(state.params).items():
        assert x.sharding.spec == expected_spec(path_str(path)), (path_str(path), x.sharding.spec)
    adam = state.opt_state[0]
    for moment in (adam.mu, adam.nu):
        for path, x in flatten(moment).items():
            assert x.sharding.spec == expected_spec(path_str(path)), path_str(path)


def test_a_rule_splits_the_conv_stack():
    plan = parallel.Plan.from_config(MeshConfig(data=4, tensor=2, rules={"conv": "tensor"}))
    model = jaxtune.from_config(dict(CONFIG), task="ctc", shardings=lambda m: plan.param_shardings(m))
    flat = {path_str(p): x for p, x in flatten(jaxtune.models.split(model)[1]).items()}
    assert flat["wav2vec2/feature_extractor/conv_layers/1/conv/kernel"].sharding.spec == P(None, "tensor", None)
    assert flat["wav2vec2/feature_extractor/conv_layers/0/conv/kernel"].sharding.spec == P(None, None, "tensor")
    assert flat["wav2vec2/feature_projection/projection/kernel"].sharding.spec == P("tensor", "fsdp")
