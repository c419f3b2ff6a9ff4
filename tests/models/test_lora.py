"""LoRA on every family (jaxtune.lora): step 0 equals the base; the merged export equals jaxtune with
its adapters and transformers reads it with the same logits (fp32, padded batches); frozen kernels
get no weight-gradient matmul, no optimizer state and stay bit-identical; the optax chain's
per-parameter rules reach the adapters; sharded adapters on 8 devices equal one device; mistakes
are one-line ConfigErrors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtune
from jaxtune import lora
from jaxtune.config import OptimConfig
from jaxtune.errors import ConfigError
from jaxtune.models import family_of, flatten, from_config, from_pretrained, merge, path_str, split, unflatten
from jaxtune.optim import make_optimizer, pretrained_tree
from jaxtune.parallel import Plan
from jaxtune.tasks import make_loss_fn
from jaxtune.train import init_state, make_train_step

import _tiny_gpt2_vit as tg
import _tiny_llama as tl



# (family, task, transformers Auto class, input kind): every family and every kind of head
CASES = [
    ("bert", "sequence-classification", "AutoModelForSequenceClassification", "bert"),
    ("roberta", "sequence-classification", "AutoModelForSequenceClassification", "bert"),
    ("xlm-roberta", "token-classification", "AutoModelForTokenClassification", "bert"),
    ("distilbert", "sequence-classification", "AutoModelForSequenceClassification", "bert"),
    ("bert", "masked-lm", "AutoModelForMaskedLM", "bert"),
    ("gpt2", "sequence-classification", "AutoModelForSequenceClassification", "tokens"),
    ("gpt2", "causal-lm", "AutoModelForCausalLM", "tokens"),
    ("vit", "image-classification", "AutoModelForImageClassification", "pixels"),
    ("llama", "causal-lm", "AutoModelForCausalLM", "tokens"),
    ("mistral", "sequence-classification", "AutoModelForSequenceClassification", "tokens"),
    ("qwen2", "causal-lm", "AutoModelForCausalLM", "tokens"),
    ("qwen3", "sequence-classification", "AutoModelForSequenceClassification", "tokens"),
]


def _checkpoint(arch, task, tiny, tiny2, tiny3):
    if arch in ("gpt2", "vit"):
        return tiny2(arch, task).path
    if arch in tl.MODEL_TYPES:
        return tiny3(arch, task).path
    return tiny(arch, task).path


def _batch(kind, path, batch_for):
    import transformers

    if kind == "pixels":
        return tg.pixel_batch()
    if kind == "tokens":
        return tg.token_batch()
    return batch_for(transformers.AutoConfig.from_pretrained(path))


def _perturbed(model, seed=1):
    """The model's trainable params with every adapter B (and head) random: adapters that matter."""
    trainable, frozen = lora.partition(model)
    key = jax.random.PRNGKey(seed)
    flat = {}
    for i, (p, v) in enumerate(flatten(trainable).items()):
        flat[p] = v + 0.2 * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype)
    return unflatten(flat), frozen


def _logits(model, params, batch):
    graphdef, _, rest = split(model)
    return np.asarray(merge(graphdef, params, rest)(**batch).logits)


@pytest.mark.parametrize("arch,task,auto,kind", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_step0_is_the_base_and_the_merged_export_matches_transformers(arch, task, auto, kind, tiny, tiny2,
                                                                       tiny3, batch_for, tmp_path):
    import transformers

    path = _checkpoint(arch, task, tiny, tiny2, tiny3)
    batch = _batch(kind, path, batch_for)
    model = from_pretrained(path, task)
    base = np.asarray(model(**batch).logits)
    spec = lora.apply(model, rank=3, alpha=5.0)
    assert spec.targets and all(p[-1] == "kernel" for p in spec.targets)
    np.testing.assert_array_equal(np.asarray(model(**batch).logits), base)  # B = 0: exactly the base

    trainable, frozen = _perturbed(model)
    ours = _logits(model, lora.combine(trainable, frozen), batch)
    assert np.abs(ours - base).max() > 1e-2  # the adapters change the outputs
    jaxtune.save_pretrained(model, tmp_path, params=lora.merged_params(spec, lora.combine(trainable, frozen)))
    theirs = getattr(transformers, auto).from_pretrained(tmp_path).eval()
    ref = tg.torch_forward(theirs, batch).logits.numpy()
    keep = np.asarray(batch["attention_mask"], bool) if kind != "pixels" and ref.ndim == 3 else None
    assert tg.max_diff(ours, ref, keep) < 1e-4


def test_default_targets_and_train_also_per_family(tiny, tiny2, tiny3):
    expect = {
        ("bert", "sequence-classification"): (r"attention/self/(query|key|value)|attention/output/dense|"
                                              r"intermediate/dense|layer/\d+/output/dense", ("^classifier/",)),
        ("distilbert", "sequence-classification"): (r"(q|k|v|out)_lin|ffn/lin[12]",
                                                    ("^classifier/", "^pre_classifier/")),
        ("gpt2", "causal-lm"): (r"attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj", ()),
        ("vit", "image-classification"): (r"attention/attention/(query|key|value)|output/dense|intermediate/dense",
                                          ("^classifier/",)),
        ("qwen3", "sequence-classification"): (r"self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj", ("^score/",)),
    }
    for (arch, task), (kernels, heads) in expect.items():
        model = from_pretrained(_checkpoint(arch, task, tiny, tiny2, tiny3), task)
        all_kernels = [p for p in flatten(split(model)[1]) if p[-1] == "kernel" and len(p) > 3]
        spec = lora.apply(model)
        names = [path_str(p) for p in spec.targets]
        assert names and all(re.search(kernels, n) for n in names), names
        # every projection of every layer, nothing outside the layers (embeddings, pooler, heads)
        assert len(names) == sum(bool(re.search(kernels, path_str(p))) for p in all_kernels)
        assert spec.train_also == heads and spec.rank == 8 and spec.alpha == 16


def test_frozen_kernels_get_no_gradient_no_optimizer_state_and_stay_bit_identical(tiny, batch_for):
    path = tiny("bert", "sequence-classification").path
    model = from_pretrained(path, "sequence-classification")
    spec = lora.apply(model, rank=2, targets=r"attention/self/(query|value)/kernel$")
    trainable, frozen = lora.partition(model)
    assert set(p[-1] for p in flatten(trainable)) == {"lora_a", "lora_b", "kernel", "bias"}
    assert all(p[0] == "classifier" or p[-1] in lora.LORA_LEAVES for p in flatten(trainable))
    tx = optax.adamw(1e-2)
    step = make_train_step(lora.make_loss_fn(model), tx, has_model_state=True)
    state = init_state(trainable, jax.random.PRNGKey(0), frozen, tx=tx)
    batch = dict(batch_for(model.config), labels=np.array([0, 1, 1]), weights=np.ones(3, np.float32))

    # no dot_general anywhere in the step (forward, backward, nested jaxprs) yields a frozen kernel's shape,
    # except the rank-2 product A @ B that merged_dense adds to a kernel (lhs: A, (in, rank))
    frozen_shapes = {tuple(v.shape) for p, v in flatten(frozen).items() if p[-1] == "kernel" and v.ndim == 2}
    assert {(30, 30), (30, 37), (37, 30)} <= frozen_shapes  # hidden 30, intermediate 37, pooler 30x30

    def dots(jaxpr, out):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general" and tuple(e.invars[0].aval.shape)[-1:] != (2,):
                out.append(tuple(e.outvars[0].aval.shape))
            for v in e.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        dots(getattr(inner, "jaxpr", inner), out)
        return out

    shapes = dots(jax.make_jaxpr(step)(state, batch).jaxpr, [])
    assert (30, 2) in shapes  # the adapters' gradients are there (B's: a (2, 30) product of A-side rows)
    assert not frozen_shapes & set(shapes), sorted(frozen_shapes & set(shapes))
    # ... and the compiled step has no such dot either
    hlo = jax.jit(step).lower(state, batch).compile().as_text()
    dot_shapes = {tuple(map(int, m.split(","))) for m, lhs_last in
                  re.findall(r"f32\[(\d+,\d+)\]\{[^}]*\} dot\(f32\[[\d,]*?(\d+)\]", hlo) if lhs_last != "2"}
    assert not frozen_shapes & dot_shapes

    # optimizer state for the trainable params only: Adam's moments mirror them, nothing else
    assert set(flatten(state.opt_state[0].mu)) == set(flatten(trainable)) == set(flatten(state.opt_state[0].nu))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == 2 * sum(x.size for x in jax.tree.leaves(trainable)) + 1

    before = {p: np.asarray(v) for p, v in flatten(frozen).items()}
    jstep = jax.jit(step, donate_argnums=0)
    for _ in range(3):
        state, metrics = jstep(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    after = flatten(state.model_state)
    assert all(np.array_equal(before[p], np.asarray(after[p])) for p in before)
    assert not np.array_equal(np.asarray(flatten(state.params)[spec.targets[0][:-1] + ("lora_b",)]), 0)


def test_optimizer_rules_reach_the_adapters(tiny):
    """Layer-wise LR decay gives adapters their layer's multiplier; decay toward the initial weights
    anchors them (B at 0, A at its init); freeze patterns match adapter paths."""
    path = tiny("bert", "sequence-classification").path
    model, info = from_pretrained(path, "sequence-classification", num_labels=3, output_loading_info=True, ignore_mismatched_sizes=True)
    lora.apply(model, rank=2)
    trainable, _ = lora.partition(model)
    family = family_of(model)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, decay_toward="pretrained", layerwise_lr_decay=0.5)
    opt = make_optimizer(cfg, trainable, pretrained=pretrained_tree(trainable, info["fresh"]),
                         depth_of=lambda p: family.depth_of(model.config, p), total_steps=10)
    layer0 = opt.plan["bert/encoder/layer/0/attention/self/query/lora_a"]
    layer1 = opt.plan["bert/encoder/layer/1/output/dense/lora_b"]
    head = opt.plan["classifier/kernel"]
    assert (layer0.multiplier, layer1.multiplier, head.multiplier) == (0.25, 0.5, 1.0)
    assert layer0.decay == layer1.decay == "pretrained" and head.decay == "zero"  # the head is fresh
    assert len(opt.plan) == len(flatten(trainable))
    frozen_a = make_optimizer(OptimConfig(freeze=[r"layer/0/.*lora_a$"]), trainable, total_steps=10)
    assert frozen_a.plan["bert/encoder/layer/0/intermediate/dense/lora_a"].frozen
    assert not frozen_a.plan["bert/encoder/layer/0/intermediate/dense/lora_b"].frozen


def test_adapter_dropout_trains_with_masks_and_evaluates_without(tiny, batch_for):
    path = tiny("bert", "sequence-classification").path
    batch = batch_for(tiny("bert").model.config)
    losses = {}
    for rate in (0.0, 0.5):
        model = from_pretrained(path, "sequence-classification",
                                config_overrides={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
        lora.apply(model, rank=2, dropout=rate)
        trainable, frozen = _perturbed(model)
        loss_fn = lora.make_loss_fn(model)
        b = dict(batch, labels=np.array([0, 1, 1]), weights=np.ones(3, np.float32))
        losses[rate] = float(loss_fn(trainable, frozen, b, jax.random.PRNGKey(0))[0])
        eval_fn = lora.make_eval_fn(model)
        out = eval_fn(trainable, frozen, b)
        losses[rate, "eval"] = float(out["loss_sum"]) if "loss_sum" in out else float(jax.tree.leaves(out)[0])
    assert losses[0.0] != losses[0.5]  # dropout on the adapters' input in training
    assert losses[0.0, "eval"] == losses[0.5, "eval"]  # none in evaluation


def test_sharded_adapters_on_8_devices_equal_one_device():
    """FSDP x TP (2 x 2 x 2): adapters follow the kernels' logical axes (A's input like the kernel's
    input, B's output like its output, the rank replicated); 3 steps equal one device's."""
    config = dict(tg.GPT2_SHARDED)
    batches = tg.lm_batches(steps=3)

    def train(plan):
        model = from_config(dict(config), task="causal-lm", shardings=plan.param_shardings)
        spec = lora.apply(model, rank=4, train_also=[r"ln_f/"])
        trainable, frozen = lora.partition(model)
        sh_t, sh_f = lora.partition(spec, plan.param_shardings(model))
        tx = optax.adamw(1e-2)
        state = plan.create_state(trainable, tx, param_shardings=sh_t).replace(model_state=frozen)
        abstract = plan.abstract_state(trainable, tx, sh_t, model_state=frozen, model_state_shardings=sh_f)
        step = plan.jit_train_step(make_train_step(lora.make_loss_fn(model), tx, has_model_state=True), abstract)
        losses = []
        for b in batches:
            state, m = step(state, plan.shard_batch(b))
            losses.append(float(m["loss"]))
        return state, losses

    one, losses1 = train(Plan.from_config(None, devices=jax.devices()[:1]))
    eight, losses8 = train(Plan.from_config(None, data=2, fsdp=2, tensor=2))
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    flat1, flat8 = flatten(one.params), flatten(eight.params)
    for p in flat1:
        np.testing.assert_allclose(np.asarray(flat8[p]), np.asarray(flat1[p]), atol=2e-5, err_msg=path_str(p))
    specs = {path_str(p): tuple(v.sharding.spec) for p, v in flat8.items()}
    assert specs["transformer/h/0/attn/c_attn/lora_a"] == ("fsdp", None)  # (embed, rank)
    assert specs["transformer/h/0/attn/c_attn/lora_b"] == (None, None, "tensor")  # (rank, 3, heads)
    assert specs["transformer/h/1/mlp/c_proj/lora_a"] == ("tensor", None)  # (mlp, rank)
    assert specs["transformer/h/1/mlp/c_proj/lora_b"] == (None, "fsdp")  # (rank, embed)
    frozen8 = flatten(eight.model_state)
    assert tuple(frozen8[("transformer", "h", 0, "mlp", "c_fc", "kernel")].sharding.spec) == ("fsdp", "tensor")
    # the optimizer's moments follow the adapters
    mu = flatten(eight.opt_state[0].mu)
    assert tuple(mu[("transformer", "h", 0, "attn", "c_attn", "lora_a")].sharding.spec) == ("fsdp", None)


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "lora.rank must be a positive integer, got 0"),
    (dict(alpha=-1.0), "lora.alpha must be >= 0, got -1.0"),
    (dict(targets=r"LayerNorm/scale$"), "matches bert/embeddings/LayerNorm/scale (shape (30,)), which is not the "
                                        "matrix of a linear layer"),
    (dict(targets=r"word_embeddings"), "which is not the matrix of a linear layer"),
    (dict(targets=r"attention/self/qkv"), "matches no parameter; it could match: bert/encoder/layer/N/attention/"
                                          "output/dense/kernel, bert/encoder/layer/N/attention/self/key/kernel, "),
    (dict(train_also=["^head/"]), "lora.train_also: '^head/' matches no parameter; paths start with"),
    (dict(targets="query/kernel$", train_also=["query"]), "is matched by both lora.targets and lora.train_also"),
    (dict(targets="(query"), "lora.targets: invalid regex '(query'"),
])
def test_bad_settings_are_one_line_errors(tiny, kwargs, message):
    model = from_pretrained(tiny("bert", "sequence-classification").path, "sequence-classification")
    with pytest.raises(ConfigError) as e:
        lora.apply(model, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert lora.spec_of(model) is None or kwargs.get("rank") is None


def test_make_loss_fn_on_a_lora_model_is_the_plain_loss_of_the_combined_params(tiny, batch_for):
    model = from_pretrained(tiny("bert", "sequence-classification").path, "sequence-classification")
    lora.apply(model, rank=2)
    trainable, frozen = _perturbed(model)
    b = dict(batch_for(model.config), labels=np.array([0, 1, 1]), weights=np.ones(3, np.float32))
    key = jax.random.PRNGKey(3)
    plain = make_loss_fn(model)(lora.combine(trainable, frozen), b, key)[0]
    ours = lora.make_loss_fn(model)(trainable, frozen, b, key)[0]
    assert float(plain) == float(ours)
    assert jnp.isfinite(ours)
