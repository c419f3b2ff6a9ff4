"""Llama family, how weights arrive and how they run: a bf16 checkpoint in several safetensors files
(`model.safetensors.index.json`) loaded straight onto 8-device shardings, remat, bf16 compute, and
sampled KV-cache generation with grouped-query attention."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import parallel
from jaxtune.models import flatten, from_pretrained, merge, path_str, split
from jaxtune.models import generate as gen

import _tiny_gpt2_vit as tg
import _tiny_llama as tl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tl.Factory(tmp_path_factory)


@pytest.fixture(scope="module")
def bf16_sharded(tmp_path_factory):
    """A qwen2 checkpoint (q/k/v biases, 6 heads / 2 kv heads) stored as bf16 in several files."""
    import torch

    model = tl.build_hf_model("qwen2").to(torch.bfloat16)
    path = tmp_path_factory.mktemp("qwen2-bf16")
    model.save_pretrained(path, max_shard_size="20KB")
    return path, model


def test_bf16_index_checkpoint_loads_onto_its_shardings(bf16_sharded):
    import torch
    import transformers

    path, model = bf16_sharded
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("model-*.safetensors"))) > 1
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=4)
    shardings = functools.partial(parallel.param_shardings, mesh=mesh)
    ours = from_pretrained(path, task="causal-lm", dtype="float32", shardings=shardings)
    # every array is created on its sharding as it is read: the default rules, e.g. q_proj
    # (embed, heads) -> (fsdp, tensor); nothing is left on one device
    expected = parallel.param_shardings(ours, mesh)
    got = flatten(split(ours)[1])
    for p, array in got.items():
        assert array.sharding == flatten(expected)[p], path_str(p)
    q = next(a for p, a in got.items() if path_str(p).endswith("layers/0/self_attn/q_proj/kernel"))
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (36 // 2, 36 // 4)
    # the stored bf16 values, exactly, as float32
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(q), state["model.layers.0.self_attn.q_proj.weight"].T)
    # logits equal transformers' on the same bf16 weights computed in fp32, both paddings
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for side in ("right", "left"):
        batch = tg.token_batch(side=side, seed=2)
        keep = batch["attention_mask"].astype(bool)
        want = tg.torch_forward(ref, batch).logits
        assert tg.max_diff(ours(**batch).logits, want, keep) < 1e-4


def test_remat_gives_the_same_gradients(tiny):
    t = tiny("llama")
    batch = tg.token_batch(side="left", seed=3)
    grads = []
    for remat in (False, True):
        graphdef, params, rest = split(from_pretrained(t.path, remat=remat))

        def loss(params):
            return merge(graphdef, params, rest)(**batch).logits.sum()

        grads.append(flatten(jax.grad(loss)(params)))
    for p, g in grads[0].items():
        np.testing.assert_allclose(g, grads[1][p], atol=1e-5, err_msg=path_str(p))


def test_bf16_compute_stays_close_to_fp32(tiny):
    """compute_dtype bfloat16: matmuls in bf16, parameters kept fp32; logits near the fp32 ones."""
    t = tiny("qwen3")
    batch = tg.token_batch(side="right", seed=4)
    keep = batch["attention_mask"].astype(bool)
    full = from_pretrained(t.path)
    half = from_pretrained(t.path, compute_dtype="bfloat16")
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(split(half)[1]))
    a, b = full(**batch).logits, half(**batch).logits
    assert b.dtype == jnp.bfloat16 or b.dtype == jnp.float32
    diff = tg.max_diff(b.astype(jnp.float32), a, keep)
    assert 0 < diff < 0.05 * float(np.abs(np.asarray(a))[keep].max())  # bf16 really ran, and is close


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])  # 4 heads / 1 kv head; 6 / 2 with a window
def test_sampled_generation_with_gqa(tiny, model_type):
    model = from_pretrained(tiny(model_type).path, task="causal-lm")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 97, size=(3, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # left padding
    ids[0, :3] = 0
    kw = dict(max_new_tokens=10, eos_token_id=(), do_sample=True)
    a = gen.generate(model, ids, mask, seed=1, **kw).tokens
    np.testing.assert_array_equal(a, gen.generate(model, ids, mask, seed=1, **kw).tokens)
    assert not np.array_equal(a, gen.generate(model, ids, mask, seed=2, **kw).tokens)
    greedy = gen.generate(model, ids, mask, max_new_tokens=10, eos_token_id=()).tokens
    np.testing.assert_array_equal(gen.generate(model, ids, mask, seed=3, top_k=1, **kw).tokens, greedy)
    # with top_k 5, each token sampled through the KV cache is among the 5 most likely of the same
    # sequence replayed without the cache (so the cached GQA logits are the model's)
    a = np.asarray(gen.generate(model, ids, mask, seed=4, top_k=5, **kw).tokens)
    seq = np.concatenate([ids, a], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(a)], axis=1)
    logits = np.asarray(model(input_ids=seq, attention_mask=full_mask,
                              position_ids=np.maximum(np.cumsum(full_mask, 1) - 1, 0)).logits)
    for t in range(a.shape[1]):
        step = logits[:, ids.shape[1] - 1 + t]
        rank = (step > step[np.arange(3), a[:, t]][:, None]).sum(1)
        assert (rank < 5).all(), (t, rank)
