"""Loading paths (sharded safetensors, .bin, HF cache, device shardings) and model conventions
(logical axes, depths, dropout, jit)."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtune.models import from_pretrained, get_family, logical_axes, merge, split
from jaxtune.models import abstract_model, depth_tree, flatten

ARCHS = ("bert", "roberta", "xlm-roberta", "distilbert")
TASKS = ("base", "sequence-classification", "token-classification", "masked-lm")
AXIS_NAMES = {"vocab", "embed", "mlp", "heads", "kv", "position", "type", "classes", None}


def params_of(model) -> dict:
    return {k: np.asarray(v) for k, v in flatten(split(model)[1]).items()}


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k


def test_sharded_safetensors_load_like_one_file(tiny, tmp_path):
    t = tiny("bert", "masked-lm")
    t.model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_params(from_pretrained(tmp_path, task="masked-lm"), from_pretrained(t.path, task="masked-lm"))


def test_pytorch_bin_loads_like_safetensors(tiny, tmp_path):
    import torch

    t = tiny("distilbert", "sequence-classification", num_labels=3)
    shutil.copy(t.path / "config.json", tmp_path / "config.json")
    torch.save(t.model.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_params(from_pretrained(tmp_path), from_pretrained(t.path))


def test_hub_id_resolves_from_the_local_hf_cache(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    t = tiny("roberta", "base")
    repo = tmp_path / "models--jaxtune-test--tiny-roberta"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(t.path, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert_same_params(from_pretrained("jaxtune-test/tiny-roberta"), from_pretrained(t.path))


@pytest.mark.parametrize("as_callable", [False, True])
def test_shardings_place_each_param_as_it_is_read(tiny, batch_for, as_callable):
    t = tiny("bert", "sequence-classification", num_labels=3)
    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rules = {"embed": "data", "heads": "model", "mlp": None, "vocab": None}

    def shardings_of(abstract):
        def spec(axes, leaf):
            names = [rules.get(a) for a in axes]
            # Shard a dim only where the mesh axis divides it (hidden 30 does not split 4 ways).
            names = [n if n and leaf.shape[i] % mesh.shape[n] == 0 else None for i, n in enumerate(names)]
            return NamedSharding(mesh, P(*names))

        return jax.tree.map(spec, logical_axes(abstract), split(abstract)[1],
                            is_leaf=lambda x: isinstance(x, tuple))

    cls = get_family("bert").head("sequence-classification")
    abstract = abstract_model(cls, from_pretrained(t.path).config)
    expected = shardings_of(abstract)
    model = from_pretrained(t.path, shardings=shardings_of if as_callable else expected)
    flat_exp, flat_got = flatten(expected), flatten(split(model)[1])
    assert any(s.spec != P() and any(s.spec) for s in flat_exp.values())  # something is really split
    for path, array in flat_got.items():
        assert array.sharding == flat_exp[path], path
    plain = from_pretrained(t.path)
    assert_same_params(model, plain)
    batch = batch_for(plain.config)
    np.testing.assert_allclose(np.asarray(model(**batch).logits), np.asarray(plain(**batch).logits),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_param_has_logical_axes_and_a_depth(tiny, arch):
    family = get_family(arch)
    config = from_pretrained(tiny(arch, "base").path).config
    L = family.num_layers(config)
    assert L == 2
    for task in TASKS:
        model = abstract_model(family.head(task), config)
        params = flatten(split(model)[1])
        axes = flatten(logical_axes(model))
        depths = flatten(depth_tree(family, config, split(model)[1]))
        for path, leaf in params.items():
            names = axes[path]
            assert len(names) == len(leaf.shape), path
            assert set(names) <= AXIS_NAMES, (path, names)
            # Every matrix can be sharded; only small head-internal vectors may be unnamed.
            assert any(names) or (len(names) == 1 and path[-1] == "bias"), (path, names)
            d = depths[path]
            if "embeddings" in path:
                assert d == 0, path
            elif "layer" in path:
                assert d == path[path.index("layer") + 1] + 1, path
            else:  # pooler and task heads
                assert d == L + 1, path
        assert sorted(set(depths.values())) == list(range(L + 2 if task != "base" or arch != "distilbert" else L + 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_only_in_training_and_seeded(tiny, batch_for, arch):
    # Only the head's dropout is on: proves the head gets its own keys, not just the encoder.
    t = tiny(arch, "sequence-classification", num_labels=3)
    drop = {"seq_classif_dropout": 0.5} if arch == "distilbert" else {"classifier_dropout": 0.5}
    model = from_pretrained(t.path, config_overrides=drop)
    batch = batch_for(model.config)
    eval_out = model(**batch).logits
    key = jax.random.key(0)
    assert np.array_equal(model(**batch, rngs=key).logits, eval_out)  # deterministic by default
    a = model(**batch, deterministic=False, rngs=key).logits
    b = model(**batch, deterministic=False, rngs=jax.random.key(0)).logits
    c = model(**batch, deterministic=False, rngs=jax.random.key(1)).logits
    assert np.array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, eval_out)
    d = model(**batch, deterministic=False, rngs=nnx.Rngs(dropout=0)).logits  # nnx.Rngs works too
    assert d.shape == a.shape and not np.allclose(d, eval_out)
    with pytest.raises(ValueError, match="rngs"):
        model(**batch, deterministic=False)


def test_encoder_dropout_is_seeded_too(tiny, batch_for):
    t = tiny("roberta", "base")
    model = from_pretrained(t.path)  # hidden and attention dropout 0.1 from the HF defaults
    batch = batch_for(model.config)
    h = [model(**batch, deterministic=False, rngs=jax.random.key(k)).last_hidden_state for k in (0, 0, 1)]
    assert np.array_equal(h[0], h[1]) and not np.allclose(h[0], h[2])


def test_pure_jitted_forward_matches_eager(tiny, batch_for):
    t = tiny("xlm-roberta", "token-classification", num_labels=5)
    model = from_pretrained(t.path)
    graphdef, params, rest = split(model)
    batch = batch_for(model.config)

    @jax.jit
    def forward(params, batch, key):
        return merge(graphdef, params, rest)(**batch, deterministic=False, rngs=key).logits

    key = jax.random.key(7)
    np.testing.assert_allclose(forward(params, batch, key),
                               model(**batch, deterministic=False, rngs=key).logits, atol=1e-5)


def test_remat_gives_the_same_gradients(tiny, batch_for):
    t = tiny("distilbert", "sequence-classification", num_labels=3)
    batch = batch_for(from_pretrained(t.path).config)
    grads = []
    for remat in (False, True):
        graphdef, params, rest = split(from_pretrained(t.path, remat=remat))

        def loss(params):
            return merge(graphdef, params, rest)(**batch).logits.sum()

        grads.append(flatten(jax.grad(loss)(params)))
    for path, g in grads[0].items():
        np.testing.assert_allclose(g, grads[1][path], atol=1e-5, err_msg=str(path))
