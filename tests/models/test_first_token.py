"""Classification heads that read only the first token run their last layer for that token alone.

The values must not change: logits equal the full computation's (the path
`output_hidden_states=True` takes), in eval and in training with dropout on (the kept row draws
the dropout mask it would get in the full layer), and so do the gradients. And the work must
really shrink: the last layer's feed-forward runs on one row per example.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import from_pretrained, merge, split

import _tiny_gpt2_vit as tg

HEADS = [("bert", "sequence-classification"), ("roberta", "sequence-classification"),
         ("xlm-roberta", "sequence-classification"), ("distilbert", "sequence-classification"),
         ("vit", "image-classification")]
INTERMEDIATE = 37  # the tiny configs' feed-forward width


@pytest.fixture(scope="module")
def vit_tiny(tmp_path_factory):
    return tg.Factory(tmp_path_factory)


def load(tiny, vit_tiny, batch_for, arch, task):
    """(jaxtune model, batch) for a tiny checkpoint with hidden and attention dropout on."""
    if arch == "vit":  # ViT's defaults have no dropout
        t = vit_tiny("vit", task, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        return from_pretrained(t.path, task=task), tg.pixel_batch()
    t = tiny(arch, task, num_labels=3)  # transformers' defaults: dropout 0.1
    return from_pretrained(t.path, task=task), batch_for(t.model.config)


def train_logits(model, batch, key, full):
    """Training-mode logits of the head as called (first token) or of the full last layer."""
    return model(**batch, output_hidden_states=full, deterministic=False, rngs=key).logits


@pytest.mark.parametrize("arch,task", HEADS)
def test_same_logits_and_gradients_as_the_full_last_layer(tiny, vit_tiny, batch_for, arch, task):
    model, batch = load(tiny, vit_tiny, batch_for, arch, task)
    out = model(**batch)
    assert out.last_hidden_state is None and out.hidden_states is None
    full = model(**batch, output_hidden_states=True)
    assert full.last_hidden_state is None and len(full.hidden_states) == 3
    np.testing.assert_allclose(out.logits, full.logits, atol=1e-6, rtol=1e-6)

    key = jax.random.key(7)
    a, b = train_logits(model, batch, key, False), train_logits(model, batch, key, True)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
    assert not np.allclose(a, out.logits, atol=1e-3)  # dropout was on

    graphdef, params, rest = split(model)

    def loss(p, full):
        return jnp.sum(train_logits(merge(graphdef, p, rest), batch, key, full) ** 2)

    g_first, g_full = jax.grad(loss)(params, False), jax.grad(loss)(params, True)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g_first), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_first)) > 1e-2


@pytest.mark.parametrize("arch,task", HEADS)
def test_last_feed_forward_runs_on_one_row_per_example(tiny, vit_tiny, batch_for, arch, task):
    model, batch = load(tiny, vit_tiny, batch_for, arch, task)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    B, T = model(**batch, output_hidden_states=True).hidden_states[0].shape[:2]

    def up_projections(full):
        """The result shapes of the feed-forward up-projections, one per layer, in order."""
        text = jax.jit(lambda b: model(**b, output_hidden_states=full).logits).lower(batch).as_text()
        return re.findall(rf"dot_general.*-> tensor<(\d+x\d+)x{INTERMEDIATE}xf32>", text)

    assert up_projections(True) == [f"{B}x{T}"] * 2
    assert up_projections(False) == [f"{B}x{T}", f"{B}x1"]
