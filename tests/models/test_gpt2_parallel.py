"""GPT-2 causal-LM training on 8 fake CPU devices (data=2 x fsdp=2 x tensor=2): the same losses and
parameters as one device, every parameter and Adam moment sharded as the default rules say."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxtune import parallel
from jaxtune.config import MeshConfig
from jaxtune.models import flatten, path_str

_spec = importlib.util.spec_from_file_location("_tiny_gpt2_vit", Path(__file__).with_name("_tiny_gpt2_vit.py"))
tg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tg)

# embed -> fsdp; heads, mlp, vocab -> tensor; position and unnamed dims replicated.
EXPECTED = [
    (r"wte/embedding$", P("tensor", "fsdp")),
    (r"wpe/embedding$", P(None, "fsdp")),
    (r"(ln_1|ln_2|ln_f)/(scale|bias)$", P("fsdp")),
    (r"attn/c_attn/kernel$", P("fsdp", None, "tensor")),
    (r"attn/c_attn/bias$", P(None, "tensor")),
    (r"attn/c_proj/kernel$", P("tensor", "fsdp")),
    (r"mlp/c_fc/kernel$", P("fsdp", "tensor")),
    (r"mlp/c_fc/bias$", P("tensor")),
    (r"mlp/c_proj/kernel$", P("tensor", "fsdp")),
    (r"c_proj/bias$", P("fsdp")),
]


def expected_spec(path: str) -> P:
    for pattern, spec in EXPECTED:
        if re.search(pattern, path):
            return spec
    raise AssertionError(f"no expectation for {path}")


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_sharded_causal_lm_matches_one_device():
    batches = tg.lm_batches()
    one = parallel.Plan.from_config(None, devices=jax.devices()[:1], data=1)
    ref_state, ref_losses = tg.train(one, tg.GPT2_SHARDED, "causal-lm", batches)
    plan = parallel.Plan.from_config(MeshConfig(data=2, fsdp=2, tensor=2))
    state, losses = tg.train(plan, tg.GPT2_SHARDED, "causal-lm", batches)

    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[0] != losses[-1]
    got, want = flatten(host(state.params)), flatten(host(ref_state.params))
    assert got.keys() == want.keys()
    for path in want:
        if path_str(path).endswith("c_attn/bias"):
            # The key bias (row 1) has a true gradient of 0 (a per-query constant under softmax):
            # Adam turns the float noise into lr-sized steps, which differ between meshes.
            got[path], want[path] = got[path][[0, 2]], want[path][[0, 2]]
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-5, err_msg=path_str(path))

    for path, x in flatten(state.params).items():
        assert x.sharding.spec == expected_spec(path_str(path)), (path_str(path), x.sharding.spec)
        assert x.sharding.mesh.shape == plan.mesh.shape
    adam = state.opt_state[0]
    for moment in (adam.mu, adam.nu):
        for path, x in flatten(moment).items():
            assert x.sharding.spec == expected_spec(path_str(path)), path_str(path)
