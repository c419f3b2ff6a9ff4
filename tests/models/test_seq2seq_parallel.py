"""Encoder-decoder (T5 v1.1 layout, BART) seq2seq-lm training on 8 fake CPU devices: FSDP x tensor
parallel (2 x 2 x 2) give the same losses and parameters as one device, and every parameter and
Adam moment is sharded as the default logical-axis rules say."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxtune import parallel
from jaxtune.config import MeshConfig
from jaxtune.models import flatten, path_str

import _tiny_gpt2_vit as tg
import _tiny_seq2seq as ts

# embed -> fsdp; heads, mlp, vocab -> tensor; positions and relative-bias tables replicated
EXPECTED = [
    (r"(^|/)shared/embedding$", P("tensor", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"relative_attention_bias/embedding$", P(None, None)),
    (r"embed_positions/embedding$", P(None, "fsdp")),
    (r"final_logits_bias$", P(None, "tensor")),
    (r"/(q|k|v|q_proj|k_proj|v_proj)/kernel$", P("fsdp", "tensor")),
    (r"/(q_proj|k_proj|v_proj)/bias$", P("tensor")),
    (r"/(o|out_proj)/kernel$", P("tensor", "fsdp")),
    (r"/(wi|wi_0|wi_1|fc1)/kernel$", P("fsdp", "tensor")),
    (r"/fc1/bias$", P("tensor")),
    (r"/(wo|fc2)/kernel$", P("tensor", "fsdp")),
    (r"/(out_proj|fc2)/bias$", P("fsdp")),
    (r"(layer_norm|layernorm_embedding)/(scale|bias)$", P("fsdp")),
]


def spec_of(path: str) -> P:
    for pattern, spec in EXPECTED:
        if re.search(pattern, path):
            return spec
    raise AssertionError(f"no expectation for {path}")


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.mark.parametrize("config,pad", [(ts.T5_SHARDED, 0), (ts.BART_SHARDED, 1)], ids=["t5", "bart"])
def test_sharded_training_matches_one_device(config, pad):
    batches = ts.seq2seq_batches(steps=3, pad=pad)
    one = parallel.Plan.from_config(None, devices=jax.devices()[:1], data=1)
    ref_state, ref_losses = tg.train(one, config, "seq2seq-lm", batches)
    plan = parallel.Plan.from_config(MeshConfig(data=2, fsdp=2, tensor=2))
    state, losses = tg.train(plan, config, "seq2seq-lm", batches)

    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[0] != losses[-1]
    got, want = flatten(host(state.params)), flatten(host(ref_state.params))
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-5, err_msg=path_str(path))
    for path, x in flatten(state.params).items():
        assert x.sharding.spec == spec_of(path_str(path)), (path_str(path), x.sharding.spec)
        assert x.sharding.mesh.shape == plan.mesh.shape
    adam = state.opt_state[0]
    for moment in (adam.mu, adam.nu):
        for path, x in flatten(moment).items():
            assert x.sharding.spec == spec_of(path_str(path)), path_str(path)
