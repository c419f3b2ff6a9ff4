"""Generation with the KV cache: greedy tokens equal transformers' `generate` (padded batch, EOS
stopping), the cache equals a full forward, sampling obeys temperature / top-k / top-p, compiles
are bounded, bad arguments are one-line errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxtune.errors import JaxtuneError
from jaxtune.models import from_pretrained
from jaxtune.models import generate as gen

import _tiny_gpt2_vit as tg

NEW = 20
# Larger weights than the parity tests' (scale 0.3): greedy output varies instead of repeating.
OPTS = dict(scale=0.3, n_embd=32, n_head=4, n_inner=None, n_positions=64)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    t = tg.Factory(tmp_path_factory)("gpt2", "causal-lm", **OPTS)
    return t, from_pretrained(t.path)


def left_padded_prompts():
    ids = np.array([[0, 0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    return ids, (ids != 0).astype(np.int64)


def hf_greedy(model, ids, mask, eos):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_matches_transformers_generate(lm):
    t, model = lm
    ids, mask = left_padded_prompts()
    ref = hf_greedy(t.model, ids, mask, eos=None)
    assert ref.shape == (2, NEW) and len(set(ref.ravel().tolist())) > 3  # not a constant stream
    out = gen.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=(), pad_token_id=0)
    np.testing.assert_array_equal(out.tokens, ref)
    np.testing.assert_array_equal(out.lengths, [NEW, NEW])
    np.testing.assert_array_equal(out.sequences, np.concatenate([ids, ref], axis=1))

    # Right-padded prompts are re-aligned: the same tokens.
    right = np.array([[5, 6, 7, 8, 0, 0, 0], ids[1]])
    again = gen.generate(model, right, (right != 0).astype(np.int64), max_new_tokens=NEW, eos_token_id=(),
                         pad_token_id=0)
    np.testing.assert_array_equal(again.tokens, ref)


def test_eos_stops_each_row_as_transformers(lm):
    t, model = lm
    ids, mask = left_padded_prompts()
    free = hf_greedy(t.model, ids, mask, eos=None)
    # An EOS that row 0 emits mid-way (and row 1 not before): row 0 stops there, pads follow.
    eos = next(int(tok) for i, tok in enumerate(free[0]) if i >= 3 and tok not in free[0][:i] and
               tok not in free[1][:i + 1])
    stop = int(np.flatnonzero(free[0] == eos)[0])
    ref = hf_greedy(t.model, ids, mask, eos=eos)
    out = gen.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(out.tokens, ref[:, :out.tokens.shape[1]])
    assert out.tokens.shape[1] == ref.shape[1]
    assert out.lengths[0] == stop + 1 and (out.tokens[0, stop + 1:] == 0).all()
    # Both rows hitting EOS ends the loop early: a 1-row batch of row 0 stops at its EOS.
    single = gen.generate(model, ids[:1], mask[:1], max_new_tokens=NEW, eos_token_id=eos)
    assert single.tokens.shape == (1, stop + 1) and single.tokens[0, -1] == eos


def test_cache_decoding_equals_full_forward(lm):
    """Logits from prefill + one-token cached steps equal a full forward over the whole sequence."""
    _, model = lm
    ids, mask = left_padded_prompts()
    out = gen.generate(model, ids, mask, max_new_tokens=6, eos_token_id=())
    seq, seq_mask = out.sequences, np.concatenate([mask, np.ones((2, 6), np.int64)], axis=1)
    pos = np.where(seq_mask == 1, np.cumsum(seq_mask, 1) - 1, 0)
    full = np.asarray(model(input_ids=seq, attention_mask=seq_mask, position_ids=pos).logits)
    # Greedy: each generated token is the argmax of the full forward one step before it.
    T = ids.shape[1]
    np.testing.assert_array_equal(full[:, T - 1:-1].argmax(-1), out.tokens)
    cache = model.init_cache(2, 16)
    first = model(input_ids=seq[:, :T], attention_mask=seq_mask[:, :T], position_ids=pos[:, :T], cache=cache)
    step = model(input_ids=seq[:, T:T + 1], attention_mask=seq_mask[:, T:T + 1], position_ids=pos[:, T:T + 1],
                 cache=first.past_key_values)
    np.testing.assert_allclose(np.asarray(first.logits)[mask == 1], full[:, :T][mask == 1], atol=1e-5)
    np.testing.assert_allclose(np.asarray(step.logits)[:, 0], full[:, T], atol=1e-5)
    assert int(step.past_key_values.index) == T + 1


def test_compiles_are_bounded(lm):
    """Prompt lengths in one bucket, sampling settings and seeds reuse one compiled loop."""
    _, model = lm
    gen._compiled.cache_clear()
    for length in (3, 5, 8):
        gen.generate(model, np.arange(3, 3 + length)[None], max_new_tokens=4, eos_token_id=())
    for seed, temperature in ((1, 0.7), (2, 1.3)):
        gen.generate(model, np.arange(3, 8)[None], max_new_tokens=4, eos_token_id=(), do_sample=True,
                     temperature=temperature, top_k=5, top_p=0.9, seed=seed)
    info = gen._compiled.cache_info()
    assert info.currsize == 2  # greedy and sampled; lengths 3..8 share the 8-token bucket
    assert gen.prompt_bucket(8) == 8 and gen.prompt_bucket(9) == 16 and gen.prompt_bucket(1) == 8


def test_sampling_respects_top_k_top_p_and_seed(lm):
    _, model = lm
    ids, mask = left_padded_prompts()
    kw = dict(max_new_tokens=8, eos_token_id=(), do_sample=True)
    a = gen.generate(model, ids, mask, seed=1, **kw).tokens
    b = gen.generate(model, ids, mask, seed=1, **kw).tokens
    c = gen.generate(model, ids, mask, seed=2, **kw).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = gen.generate(model, ids, mask, max_new_tokens=8, eos_token_id=()).tokens
    for limit in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)):
        np.testing.assert_array_equal(gen.generate(model, ids, mask, seed=3, **kw, **limit).tokens, greedy)


def test_sample_logits_distribution():
    """Draw frequencies follow softmax(logits / T) restricted by top-k and top-p (4 sigma)."""
    logits = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))
    n = 4000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    batch = np.broadcast_to(logits, (1, 5))

    def freq(**kw):
        draw = jax.vmap(lambda k: gen.sample_logits(batch, k, **kw)[0])(keys)
        return np.bincount(np.asarray(draw), minlength=5) / n

    def close(f, p):
        p = np.asarray(p) / np.sum(p)
        assert np.all(np.abs(f - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9), (f, p)

    close(freq(temperature=1.0, top_k=0, top_p=1.0), [0.4, 0.3, 0.15, 0.1, 0.05])
    close(freq(temperature=1.0, top_k=2, top_p=1.0), [0.4, 0.3, 0, 0, 0])
    # top_p 0.8: 0.4 + 0.3 < 0.8, so 0.15 is kept too (mass before it 0.7 < 0.8); 0.1 is dropped.
    close(freq(temperature=1.0, top_k=0, top_p=0.8), [0.4, 0.3, 0.15, 0, 0])
    p2 = np.array([0.4, 0.3, 0.15, 0.1, 0.05]) ** 2  # temperature 0.5 squares the probabilities
    close(freq(temperature=0.5, top_k=0, top_p=1.0), p2)


def test_generate_text_with_a_tokenizer(lm):
    """generate_text tokenizes, left-pads, generates and decodes only the new tokens."""
    _, model = lm

    class Tok:  # a character tokenizer over ids 3..96
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + (ord(c) % 90) for c in text]}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids)

    texts = gen.generate_text(model, Tok(), ["hello", "a"], max_new_tokens=5, eos_token_id=())
    ids = np.array([[3 + ord(c) % 90 for c in "hello"], [0, 0, 0, 0, 3 + ord("a") % 90]])
    want = gen.generate(model, ids, (ids != 0).astype(int), max_new_tokens=5, eos_token_id=()).tokens
    assert texts == [" ".join(map(str, row)) for row in want]
    # An empty prompt starts from the config's BOS (id 1).
    from_bos = gen.generate(model, np.array([[1]]), max_new_tokens=5, eos_token_id=()).tokens[0]
    assert gen.generate_text(model, Tok(), "", max_new_tokens=5, eos_token_id=()) == [" ".join(map(str, from_bos))]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=61), "64 positions"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(attention_mask=np.array([[0, 0, 0, 0], [1, 1, 1, 1]])), "row 0 has no tokens"),
])
def test_bad_arguments_are_one_line_errors(lm, kwargs, needle):
    _, model = lm
    ids = np.arange(3, 11).reshape(2, 4)
    with pytest.raises(JaxtuneError, match=needle) as e:
        gen.generate(model, ids, **kwargs)
    assert "\n" not in str(e.value)


def test_generate_needs_a_causal_lm_head(tmp_path_factory):
    t = tg.Factory(tmp_path_factory)("gpt2", "base")
    with pytest.raises(JaxtuneError, match="GPT2Model is not a causal-LM head"):
        gen.generate(from_pretrained(t.path), np.arange(3, 7)[None])
