"""ViT image-classification training on 8 fake CPU devices (data=2 x fsdp=2 x tensor=2): the same
losses and parameters as one device, every parameter and Adam moment sharded as the rules say."""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxtune import parallel
from jaxtune.config import MeshConfig
from jaxtune.models import flatten, path_str

import _tiny_gpt2_vit as tg

# embed -> fsdp; heads, mlp -> tensor; position, classes and unnamed dims replicated.
EXPECTED = [
    (r"cls_token$", P(None, None, "fsdp")),
    (r"position_embeddings$", P(None, None, "fsdp")),
    (r"projection/kernel$", P(None, None, None, "fsdp")),
    (r"projection/bias$", P("fsdp")),
    (r"layernorm(_before|_after)?/(scale|bias)$", P("fsdp")),
    (r"attention/attention/(query|key|value)/kernel$", P("fsdp", "tensor")),
    (r"attention/attention/(query|key|value)/bias$", P("tensor")),
    (r"attention/output/dense/kernel$", P("tensor", "fsdp")),
    (r"intermediate/dense/kernel$", P("fsdp", "tensor")),
    (r"intermediate/dense/bias$", P("tensor")),
    (r"\d+/output/dense/kernel$", P("tensor", "fsdp")),
    (r"output/dense/bias$", P("fsdp")),
    (r"classifier/kernel$", P("fsdp", None)),
    (r"classifier/bias$", P(None)),
]


def expected_spec(path: str) -> P:
    for pattern, spec in EXPECTED:
        if re.search(pattern, path):
            return spec
    raise AssertionError(f"no expectation for {path}")


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_sharded_image_classification_matches_one_device():
    batches = tg.image_batches()
    one = parallel.Plan.from_config(None, devices=jax.devices()[:1], data=1)
    ref_state, ref_losses = tg.train(one, tg.VIT_SHARDED, "image-classification", batches)
    plan = parallel.Plan.from_config(MeshConfig(data=2, fsdp=2, tensor=2))
    state, losses = tg.train(plan, tg.VIT_SHARDED, "image-classification", batches)

    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[0] != losses[-1]
    got, want = flatten(host(state.params)), flatten(host(ref_state.params))
    for path in want:
        if path_str(path).endswith("key/bias"):
            # Its true gradient is 0 (a per-query constant under softmax): Adam turns the float
            # noise into lr-sized steps, which differ between meshes.
            continue
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-5, err_msg=path_str(path))

    for path, x in flatten(state.params).items():
        assert x.sharding.spec == expected_spec(path_str(path)), (path_str(path), x.sharding.spec)
    adam = state.opt_state[0]
    for moment in (adam.mu, adam.nu):
        for path, x in flatten(moment).items():
            assert x.sharding.spec == expected_spec(path_str(path)), path_str(path)
