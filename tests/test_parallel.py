"""Sharded training on 8 fake CPU devices: same numbers on every mesh, shardings as the rules
say, FSDP memory, a real two-process run, mixed precision, remat and bad input."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxtune import parallel
from jaxtune.config import MeshConfig
from jaxtune.errors import JaxtuneError
from jaxtune.models import flatten, path_str

HERE = Path(__file__).parent
import _tiny_bert as tiny

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def batches():
    return tiny.make_batches()


@pytest.fixture(scope="module")
def reference(batches):
    """The one-device run every mesh must reproduce (with its compiled memory stats)."""
    plan = parallel.Plan.from_config(None, devices=jax.devices()[:1], data=1)
    state, losses, stats = tiny.train(plan, batches, memory=True)
    return host(state.params), losses, stats


@pytest.fixture(scope="module")
def runs(batches):
    """One run per mesh, compiled once each, shared by the tests below."""
    out = {}
    for sizes in MESHES:
        plan = parallel.Plan.from_config(MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2]))
        state, losses, stats = tiny.train(plan, batches, memory=sizes == (1, 8, 1))
        out[sizes] = (plan, state, losses, stats)
    return out


# What the default rules say for tiny BERT: embed -> fsdp; heads, mlp, vocab -> tensor;
# position, type, classes and unnamed dims replicated. vocab 99 cannot split over tensor=2.
def expected_spec(path: str, tensor: int) -> P:
    vocab = "tensor" if 99 % tensor == 0 else None
    table = [
        (r"word_embeddings/embedding$", P(vocab, "fsdp")),
        (r"(position|token_type)_embeddings/embedding$", P(None, "fsdp")),
        (r"LayerNorm/(scale|bias)$", P("fsdp")),
        (r"self/(query|key|value)/kernel$", P("fsdp", "tensor")),
        (r"self/(query|key|value)/bias$", P("tensor")),
        (r"attention/output/dense/kernel$", P("tensor", "fsdp")),
        (r"intermediate/dense/kernel$", P("fsdp", "tensor")),
        (r"intermediate/dense/bias$", P("tensor")),
        (r"\d+/output/dense/kernel$", P("tensor", "fsdp")),
        (r"output/dense/bias$", P("fsdp")),
        (r"pooler/dense/kernel$", P("fsdp", None)),
        (r"pooler/dense/bias$", P(None)),
        (r"classifier/kernel$", P("fsdp", None)),
        (r"classifier/bias$", P(None)),
    ]
    for pattern, spec in table:
        if re.search(pattern, path):
            return spec
    raise AssertionError(f"no expectation for {path}")


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_every_mesh_matches_one_device(sizes, runs, reference):
    ref_params, ref_losses, _ = reference
    plan, state, losses, _ = runs[sizes]
    assert dict(plan.mesh.shape) == dict(zip(("data", "fsdp", "tensor"), sizes))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[0] != losses[-1]  # it trained
    got = flatten(host(state.params))
    for path, want in flatten(ref_params).items():
        np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=1e-5, err_msg=path_str(path))


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_param_and_optimizer_state_shardings_follow_rules(sizes, runs):
    plan, state, _, _ = runs[sizes]
    params = flatten(state.params)
    for path, x in params.items():
        want = expected_spec(path_str(path), sizes[2])
        assert x.sharding.spec == want, (path_str(path), x.sharding.spec, want)
        assert x.sharding.mesh.shape == plan.mesh.shape
        assert x.dtype == jnp.float32
    # optax.adamw = chain(scale_by_adam, add_decayed_weights, scale): mu and nu mirror params.
    adam = state.opt_state[0]
    assert adam.count.sharding.spec == P()
    for moment in (adam.mu, adam.nu):
        for path, x in flatten(moment).items():
            assert x.sharding.spec == expected_spec(path_str(path), sizes[2]), path_str(path)
    assert state.step.sharding.spec == P() and state.rng.sharding.spec == P()


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` under `shardings` (a sharding or a tree of them)."""
    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    shs = shs * len(leaves) if len(shs) == 1 else shs
    return sum(
        int(np.prod(sh.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
        for x, sh in zip(leaves, shs)
    )


def test_fsdp_divides_per_device_argument_bytes(runs, reference, batches):
    plan, state, _, stats = runs[(1, 8, 1)]
    one = reference[2].argument_size_in_bytes
    fsdp8 = stats.argument_size_in_bytes
    ratio = fsdp8 / one
    print(f"\nper-device argument bytes: one device {one}, fsdp=8 {fsdp8}, ratio {ratio:.4f}")
    # Exact accounting: every state and batch array contributes its shard, nothing more.
    state_sh = parallel.shardings_of(state)
    assert fsdp8 == shard_bytes(state, state_sh) + shard_bytes(batches[0], plan.batch_sharding())
    total = shard_bytes(state, jax.tree.map(lambda _: parallel.replicated(plan.mesh), state_sh))
    assert one == total + sum(np.asarray(x).nbytes for x in batches[0].values())
    # About 1/8: what stays whole is tiny BERT's 355 bias floats over tensor=1 and the classifier
    # (x3 with Adam's moments) and the step counters; in a real model they are noise.
    assert 1 / 8 <= ratio < 0.15


def test_two_processes_match_one_process(tmp_path, reference, batches):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "_tiny_bert.py"), str(i), "2", str(port), str(tmp_path / f"{i}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    ref_params, ref_losses, _ = reference
    for i, r in enumerate(results):
        assert (r["process_index"], r["process_count"]) == (i, 2)
        assert (r["devices"], r["local_devices"]) == (8, 4)
        assert r["main"] is (i == 0)
        np.testing.assert_allclose(r["losses"], ref_losses, rtol=1e-5)
        want = ref_params["bert"]["encoder"]["layer"][1]["output"]["dense"]["kernel"]
        np.testing.assert_allclose(np.array(r["kernel"]), want, rtol=1e-5, atol=1e-5)


def test_bf16_compute_close_to_fp32(batches, reference):
    plan = parallel.Plan.from_config(None, data=2, fsdp=2, tensor=2)
    state, losses, _ = tiny.train(plan, batches, compute_dtype="bfloat16")
    ref_losses = reference[1]
    diff = np.abs(np.array(losses) - np.array(ref_losses))
    print(f"\nbf16 vs fp32 loss differences: {diff.tolist()}")
    assert diff.max() < 2e-2
    assert diff.max() > 0  # bf16 really ran
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))  # fp32 masters
    # the matmuls really run in bfloat16 (the params are cast on the fly)
    import jaxtune
    from jaxtune.tasks import make_loss_fn

    model = jaxtune.from_config(dict(tiny.TINY), task="sequence-classification", compute_dtype="bfloat16")
    params = jaxtune.models.split(model)[1]
    jaxpr = jax.make_jaxpr(make_loss_fn(model))(params, batches[0], jax.random.PRNGKey(0)).jaxpr
    operands = _dot_operand_dtypes(jaxpr)  # (an f32 result is fine: attention accumulates in f32)
    assert len(operands) >= 12
    assert all(dtypes == ("bfloat16", "bfloat16") for dtypes in operands), operands


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot_general in a jaxpr, nested jaxprs (jit, custom_vjp) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dot_operand_dtypes(inner)
    return found


def test_remat_identical_to_no_remat(batches, reference):
    plan = parallel.Plan.from_config(None, devices=jax.devices()[:1], data=1)
    _, losses, _ = tiny.train(plan, batches, remat=True)
    np.testing.assert_allclose(losses, reference[1], rtol=0, atol=1e-6)


def test_remat_really_rematerialises():
    """The gradient of a remat model recomputes the layer (a remat primitive in its jaxpr)."""
    import jaxtune
    from jaxtune.tasks import make_loss_fn

    batch = {k: v[:2] for k, v in tiny.make_batches(1)[0].items()}
    found = {}
    for remat in (False, True):
        model = jaxtune.from_config(dict(tiny.TINY), task="sequence-classification", remat=remat)
        params = jaxtune.models.split(model)[1]
        grad = jax.grad(lambda p: make_loss_fn(model)(p, batch, jax.random.PRNGKey(0))[0])
        found[remat] = "remat" in str(jax.make_jaxpr(grad)(params))
    assert found == {False: False, True: True}


# --------------------------------------------------------------------------------------------
# Bad input: one line each, naming the numbers.


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_mesh_not_dividing_devices():
    with pytest.raises(JaxtuneError) as e:
        parallel.make_mesh(MeshConfig(data=-1, fsdp=3))
    msg = one_line(e)
    assert "fsdp=3" in msg and "8" in msg
    with pytest.raises(JaxtuneError) as e:
        parallel.make_mesh(data=2, fsdp=2, tensor=1)
    msg = one_line(e)
    assert "4" in msg and "8" in msg


def test_batch_not_divisible_by_data_axes():
    plan = parallel.Plan.from_config(None, data=2, fsdp=2, tensor=2)
    batch = {"input_ids": np.zeros((6, 4), np.int32)}
    with pytest.raises(JaxtuneError) as e:
        plan.shard_batch(batch)
    msg = one_line(e)
    assert "6" in msg and "4 batch shards" in msg and "data=2 x fsdp=2" in msg
    with pytest.raises(JaxtuneError) as e:
        plan.local_batch_size(10)
    assert "10" in one_line(e)
    assert plan.local_batch_size(12) == 12
    sharded = plan.shard_batch({"input_ids": np.zeros((8, 4), np.int32)})["input_ids"]
    assert sharded.sharding.spec == P(("data", "fsdp"))


def test_rule_naming_unknown_mesh_axis():
    with pytest.raises(JaxtuneError) as e:
        parallel.Plan.from_config(MeshConfig(rules={"embed": "fdsp"}))
    msg = one_line(e)
    assert "mesh.rules.embed" in msg and "'fdsp'" in msg and "data, fsdp, tensor" in msg


def test_rules_overridable_and_fallback_logged(caplog):
    """A recipe's rules replace defaults; a dim the mesh does not divide is replicated and logged."""
    import jaxtune

    plan = parallel.Plan.from_config(
        MeshConfig(data=1, fsdp=4, tensor=2, rules={"mlp": None, "classes": "tensor", "vocab": ["tensor"]})
    )
    cfg = dict(tiny.TINY, vocab_size=98)
    parallel._REPORTED.clear()
    with caplog.at_level("WARNING", logger="jaxtune"):
        model = jaxtune.from_config(cfg, task="sequence-classification", shardings=plan.param_shardings)
        sh = plan.param_shardings(model)  # a second call logs nothing new
    params = jaxtune.models.split(model)[1]
    layer = params["bert"]["encoder"]["layer"][0]
    assert layer["intermediate"]["dense"]["kernel"].sharding.spec == P("fsdp", None)
    assert params["bert"]["embeddings"]["word_embeddings"]["embedding"].sharding.spec == P("tensor", "fsdp")
    # classes=3 does not divide tensor=2: replicated, reported once, naming the numbers
    assert params["classifier"]["kernel"].sharding.spec == P("fsdp", None)
    assert sh["classifier"]["bias"].spec == P(None)
    warnings = [r.getMessage() for r in caplog.records if "replicated" in r.getMessage()]
    assert len(warnings) == 1 and "classes=3 over tensor=2" in warnings[0]


def test_initialize_is_a_no_op_on_one_machine(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize() is False
    assert parallel.is_main_process()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(JaxtuneError) as e:
        parallel.initialize()
    assert "JAX_NUM_PROCESSES" in one_line(e)
