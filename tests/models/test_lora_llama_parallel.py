"""LoRA (and QLoRA) on the Llama family on 8 fake CPU devices: FSDP x tensor parallel give one
device's losses and adapters; A shards like its kernel's input, B like its output, the rank is
replicated, Adam's moments follow; kv projections the tensor axis does not divide keep replicated
adapters outputs; an NF4 base is replicated and stays bit-identical."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jaxtune import lora
from jaxtune.lora.quant import QTensor
from jaxtune.models import flatten, from_config, path_str
from jaxtune.parallel import Plan
from jaxtune.train import make_train_step

import _tiny_gpt2_vit as tg
import _tiny_llama as tl

CASES = [  # (config, mesh sizes (data, fsdp, tensor), kv output spec, base_dtype)
    (tl.SHARDED, (2, 2, 2), "tensor", None),  # 2 kv heads of 8 over tensor=2
    # an NF4 base, on the mesh whose tensor axis does not divide the kv projections (one case, not
    # two: each costs ~20 s of compilation)
    (tl.SHARDED_KV_REPLICATED, (1, 2, 4), None, "nf4"),  # qwen3: 1 kv head of 6 over tensor=4: replicated
]


def _train(plan, config, batches, base_dtype):
    model = from_config(dict(config), task="causal-lm", shardings=plan.param_shardings)
    spec = lora.apply(model, rank=4, base_dtype=base_dtype)
    trainable, frozen = lora.partition(model)
    sh_t, sh_f = lora.partition(spec, plan.param_shardings(model))
    tx = optax.adamw(1e-2)
    state = plan.create_state(trainable, tx, param_shardings=sh_t).replace(model_state=frozen)
    abstract = plan.abstract_state(trainable, tx, sh_t, model_state=frozen, model_state_shardings=sh_f)
    step = plan.jit_train_step(make_train_step(lora.make_loss_fn(model), tx, has_model_state=True), abstract)
    before = jax.tree.map(np.asarray, frozen)  # on the host: the step donates (aliases) the base
    losses = []
    for b in batches:
        state, m = step(state, plan.shard_batch(b))
        losses.append(float(m["loss"]))
    return state, losses, before


@pytest.mark.parametrize("config,sizes,kv,base_dtype", CASES, ids=["kv-split", "kv-replicated-nf4"])
def test_llama_lora_on_8_devices_equals_one_device(config, sizes, kv, base_dtype):
    batches = tg.lm_batches(steps=3)
    one, losses1, _ = _train(Plan.from_config(None, devices=jax.devices()[:1]), config, batches, base_dtype)
    data, fsdp, tensor = sizes
    eight, losses8, frozen = _train(Plan.from_config(None, data=data, fsdp=fsdp, tensor=tensor), config, batches,
                                    base_dtype)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    assert losses8[0] != losses8[-1]
    flat1, flat8 = flatten(one.params), flatten(eight.params)
    assert flat1.keys() == flat8.keys() and all(p[-1] in lora.LORA_LEAVES for p in flat8)
    for p in flat1:
        np.testing.assert_allclose(np.asarray(flat8[p]), np.asarray(flat1[p]), atol=2e-5, err_msg=path_str(p))

    specs = {path_str(p): tuple(v.sharding.spec) for p, v in flat8.items()}
    layer = "model/layers/0"
    assert specs[f"{layer}/self_attn/q_proj/lora_a"] == ("fsdp", None)  # (embed, rank)
    assert specs[f"{layer}/self_attn/q_proj/lora_b"] == (None, "tensor")  # (rank, heads)
    assert specs[f"{layer}/self_attn/k_proj/lora_b"] == (None, kv)  # (rank, kv heads)
    assert specs[f"{layer}/self_attn/o_proj/lora_a"] == ("tensor", None)
    assert specs[f"{layer}/mlp/down_proj/lora_b"] == (None, "fsdp")
    mu = flatten(eight.opt_state[0].mu)
    assert tuple(mu[("model", "layers", 0, "mlp", "up_proj", "lora_a")].sharding.spec) == ("fsdp", None)

    base = flatten(eight.model_state)
    kernel = base[("model", "layers", 1, "mlp", "gate_proj", "kernel")]
    if base_dtype is None:
        assert tuple(kernel.sharding.spec) == ("fsdp", "tensor")
    else:  # a quantized base: codes and scales replicated, unchanged by training
        assert isinstance(kernel, QTensor) and tuple(kernel.codes.sharding.spec) in ((), (None, None))
        before = flatten(frozen)[("model", "layers", 1, "mlp", "gate_proj", "kernel")]
        np.testing.assert_array_equal(np.asarray(kernel.codes), before.codes)
        np.testing.assert_array_equal(np.asarray(kernel.scale), before.scale)
