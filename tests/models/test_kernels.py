"""The two kernel sets (`cpu`: tuned for XLA CPU; `xla`: jax.nn / plain XLA for GPUs and TPUs)
compute the same values and gradients, eval and training (same dropout key, same masks), and the
`xla` train step carries none of the CPU tricks (optimization barriers, custom VJPs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune.errors import JaxtuneError
from jaxtune.models import from_config, kernels, merge, split
from jaxtune.models.layers import attention_bias
from jaxtune.tasks import make_loss_fn
from jaxtune.train import init_state, make_train_step

KERNEL_SETS = ("cpu", "xla")

TINY = {
    # exact GELU (the kernels' GELU differs), odd head count, real dropout everywhere
    "bert": dict(model_type="bert", vocab_size=61, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                 intermediate_size=40, max_position_embeddings=32, hidden_act="gelu", initializer_range=0.3,
                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2),
    "gpt2": dict(model_type="gpt2", vocab_size=61, n_embd=24, n_layer=2, n_head=3, n_positions=32,
                 activation_function="gelu", initializer_range=0.3, resid_pdrop=0.1, embd_pdrop=0.1,
                 attn_pdrop=0.2, pad_token_id=0),
}
TASK = {"bert": "sequence-classification", "gpt2": "causal-lm"}


def _batch(arch: str) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 61, (3, 9))
    mask = (np.arange(9)[None] < np.array([9, 6, 2])[:, None]).astype(np.int32)
    batch = {"input_ids": jnp.asarray(np.where(mask == 1, ids, 0)), "attention_mask": jnp.asarray(mask)}
    if arch == "bert":
        batch["token_type_ids"] = jnp.asarray(rng.integers(0, 2, (3, 9)) * mask)
    return batch


def _logits_and_grads(model, batch, *, train: bool):
    """Logits and d(sum of logits * fixed weights)/d(every parameter), traced afresh (no jit cache)."""
    graphdef, params, rest = split(model)
    key = jax.random.key(7)

    def f(p):
        out = merge(graphdef, p, rest)(**batch, deterministic=not train, rngs=key if train else None)
        w = jax.random.normal(jax.random.key(1), out.logits.shape)
        return (out.logits * w).sum(), out.logits

    (_, logits), grads = jax.value_and_grad(f, has_aux=True)(params)
    return logits, grads


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_models_match_across_kernel_sets(arch, train):
    model = from_config(dict(TINY[arch]), task=TASK[arch], seed=3)
    batch = _batch(arch)
    results = {}
    for name in KERNEL_SETS:
        with kernels.use(name):
            results[name] = _logits_and_grads(model, batch, train=train)
    (logits_cpu, grads_cpu), (logits_xla, grads_xla) = results["cpu"], results["xla"]
    np.testing.assert_allclose(logits_xla, logits_cpu, atol=1e-5, rtol=1e-5)
    flat_cpu, flat_xla = jax.tree_util.tree_leaves_with_path(grads_cpu), jax.tree.leaves(grads_xla)
    assert len(flat_cpu) == len(flat_xla) > 10
    for (path, g_cpu), g_xla in zip(flat_cpu, flat_xla):  # 1e-5 of each gradient's own scale
        scale = max(1.0, float(np.abs(g_cpu).max()))
        assert float(np.abs(np.asarray(g_xla) - np.asarray(g_cpu)).max()) <= 1e-5 * scale, jax.tree_util.keystr(path)
    if train:  # dropout really was on: training differs from eval
        with kernels.use("xla"):
            eval_logits, _ = _logits_and_grads(model, batch, train=False)
        assert np.abs(np.asarray(eval_logits) - np.asarray(logits_xla)).max() > 1e-3


def _qkv(T=6, S=6, dtype=jnp.float32, scale=1.0):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    shape = lambda n: (2, n, 3, 4)  # noqa: E731
    return tuple((scale * jax.random.normal(k, shape(n))).astype(dtype) for k, n in ((kq, T), (kk, S), (kv, S)))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_attention_matches_across_kernel_sets(train):
    q, k, v = _qkv()
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    bias = attention_bias(mask, jnp.float32) + 0.3 * jax.random.normal(jax.random.key(5), (2, 3, 6, 6))
    kw = dict(dropout_rate=0.3, deterministic=not train, rng=jax.random.key(2), scale=0.7)
    out, grads = {}, {}
    for name in KERNEL_SETS:
        with kernels.use(name):
            def f(q, k, v):
                return (kernels.dot_product_attention(q, k, v, bias, **kw) ** 2).sum()

            out[name] = kernels.dot_product_attention(q, k, v, bias, **kw)
            grads[name] = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
            # query_rows: the first query row alone gets what the full attention gives that row
            first = kernels.dot_product_attention(q[:, :1], k, v, bias[:, :, :1], query_rows=6, **kw)
            np.testing.assert_allclose(first, out[name][:, :1], atol=1e-6)
    np.testing.assert_allclose(out["xla"], out["cpu"], atol=1e-6)
    for g_xla, g_cpu in zip(grads["xla"], grads["cpu"]):
        np.testing.assert_allclose(g_xla, g_cpu, atol=1e-5)
    if train:  # dropout really was on
        eval_out = kernels.dot_product_attention(q, k, v, bias, scale=0.7)
        assert np.abs(np.asarray(out["xla"]) - np.asarray(eval_out)).max() > 1e-2


@pytest.mark.parametrize("name", KERNEL_SETS)
def test_attention_float16_is_safe(name):
    """Large float16 activations: float32 logits and softmax keep the result finite and close."""
    q, k, v = _qkv(dtype=jnp.float16, scale=30.0)
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    bias = attention_bias(mask, jnp.float32)
    with kernels.use(name):
        half = kernels.dot_product_attention(q, k, v, bias)
        full = kernels.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)), bias)
    assert half.dtype == jnp.float16 and np.isfinite(np.asarray(half, np.float32)).all()
    np.testing.assert_allclose(np.asarray(half, np.float32), full, atol=0.1, rtol=0.01)


def _primitives(jaxpr) -> set[str]:
    """Every primitive name in a jaxpr, nested jaxprs (jit, custom_vjp, scan, cond...) included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    names |= _primitives(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    names |= _primitives(sub)
    return names


def _train_step_primitives(name: str) -> set[str]:
    model = from_config(dict(TINY["bert"]), task="sequence-classification", num_labels=3)
    tx = optax.adamw(1e-3)
    state = init_state(split(model)[1], jax.random.key(0), tx=tx)
    batch = {**_batch("bert"), "labels": jnp.array([0, 2, 1])}
    step = make_train_step(make_loss_fn(model), tx)
    with kernels.use(name):
        return _primitives(jax.make_jaxpr(step)(state, batch).jaxpr)


def test_xla_train_step_has_no_cpu_tricks():
    cpu, xla = _train_step_primitives("cpu"), _train_step_primitives("xla")
    assert "optimization_barrier" in cpu and any("custom_vjp" in p for p in cpu)
    assert "optimization_barrier" not in xla
    assert not [p for p in xla if "custom_vjp" in p]


def test_choice_env_var_and_context(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.current() == ("cpu" if jax.default_backend() == "cpu" else "xla")
    q, k, v = _qkv()

    def barriers() -> bool:
        jaxpr = jax.make_jaxpr(lambda *a: kernels.dot_product_attention(*a))(q, k, v)
        return "optimization_barrier" in _primitives(jaxpr.jaxpr)

    monkeypatch.setenv(kernels.ENV_VAR, "xla")
    assert kernels.current() == "xla" and not barriers()
    with kernels.use("cpu"):  # the context wins over the environment
        assert kernels.current() == "cpu" and barriers()
    monkeypatch.setenv(kernels.ENV_VAR, "cpu")
    assert kernels.current() == "cpu" and barriers()
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(JaxtuneError, match=r"JAXTUNE_KERNELS='cuda' .*cpu, xla"):
        kernels.current()
    with pytest.raises(JaxtuneError, match="cpu, xla"):
        with kernels.use("gpu"):
            pass


def test_plain_autodiff_under_both_kernel_sets():
    """Forward mode works inside plain_autodiff() whichever kernels trace the model."""
    model = from_config(dict(TINY["bert"]), task="sequence-classification")
    graphdef, params, rest = split(model)
    batch = _batch("bert")
    tangent = jax.tree.map(jnp.ones_like, params)
    outs = {}
    for name in KERNEL_SETS:
        with kernels.use(name), kernels.plain_autodiff():
            outs[name] = jax.jvp(lambda p: merge(graphdef, p, rest)(**batch).logits, (params,), (tangent,))[1]
    np.testing.assert_allclose(outs["xla"], outs["cpu"], atol=1e-4, rtol=1e-4)


def test_gpu_attention_asks_cudnn_only_for_inputs_it_takes():
    """On a GPU, bf16/fp16 attention with head_dim a multiple of 8 up to 128 goes to cuDNN's fused
    kernel; float32, odd or large head dims, and every other platform go to XLA's. (No GPU here:
    the choice is tested, cuDNN itself is not.)"""
    from jaxtune.models.kernels.xla import attention_implementation

    def q(dtype, head_dim):
        return jax.ShapeDtypeStruct((2, 16, 4, head_dim), dtype)

    assert attention_implementation(q(jnp.bfloat16, 64), "gpu") == "cudnn"
    assert attention_implementation(q(jnp.float16, 128), "gpu") == "cudnn"
    assert attention_implementation(q(jnp.float32, 64), "gpu") == "xla"
    assert attention_implementation(q(jnp.bfloat16, 60), "gpu") == "xla"
    assert attention_implementation(q(jnp.bfloat16, 256), "gpu") == "xla"
    assert attention_implementation(q(jnp.bfloat16, 64), "tpu") == "xla"
    assert attention_implementation(q(jnp.bfloat16, 64), "cpu") == "xla"


@pytest.mark.parametrize("name", ["cpu", "xla"])
def test_frozen_dense_has_dense_values_and_input_gradient_and_no_kernel_gradient(name):
    """LoRA's frozen base layers: the same output and input gradient as the dense layer; the
    kernel's cotangent is a zero (the CPU rule computes none)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 16))
    w = jax.random.normal(jax.random.PRNGKey(1), (16, 24))
    dims = (((2,), (0,)), ((), ()))
    with kernels.use(name):
        def f(fn):
            return lambda x, w: jnp.sum(jnp.sin(fn(x, w, dims)))

        y0, (dx0, _) = jax.value_and_grad(f(kernels.dense_dot_general), argnums=(0, 1))(x, w)
        y1, (dx1, dw1) = jax.value_and_grad(f(kernels.frozen_dense_dot_general), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(y1, y0, rtol=1e-6)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-6)
    if name == "cpu":
        np.testing.assert_array_equal(dw1, 0)
