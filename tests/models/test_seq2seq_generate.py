"""Encoder-decoder generation (jaxtune.models.seq2seq_generate) gives transformers' `generate` tokens:
greedy and beam search (num_beams, length_penalty, early_stopping True / False / "never"),
batched with padded sources, EOS stopping, BART's forced EOS at the length limit; bad settings
are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from jaxtune.errors import JaxtuneError
from jaxtune.models import from_pretrained
from jaxtune.models.seq2seq_generate import generate

import _tiny_seq2seq as ts

NEW = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ts.Factory(tmp_path_factory)


def hf_generate(model, ids, mask, **kwargs):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=NEW, do_sample=False, **kwargs)
    return out.numpy()[:, 1:]  # without the decoder start token


def sources(config):
    b = ts.batch(config, seed=5)
    return b["input_ids"], b["attention_mask"]


def an_emitted_token(model, ids, mask) -> int:
    """A token greedy decoding emits mid-way in row 0 (not the first step): used as EOS, so that
    rows stop at different lengths."""
    free = hf_generate(model, ids, mask, num_beams=1, eos_token_id=None, forced_eos_token_id=None)
    return int(free[0, 3])


def as_transformers_pads(out, num_beams: int, pad: int, eos: int):
    """transformers fills beam outputs after their end with `pad_token_id or eos_token_id` (EOS when
    pad is 0); greedy ones with pad."""
    fill = (pad or eos) if num_beams > 1 else pad
    return np.where(np.arange(out.tokens.shape[1])[None] < out.lengths[:, None], out.tokens, fill)


def check_same_tokens(t, model, settings, eos):
    ids, mask = sources(t.model.config)
    pad = t.model.config.pad_token_id
    outs = []
    for kw in settings:
        ref = hf_generate(t.model, ids, mask, eos_token_id=eos, **kw)
        out = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, **kw)
        got = as_transformers_pads(out, kw["num_beams"], pad, eos)
        assert got.shape == ref.shape, (kw, got, ref)
        np.testing.assert_array_equal(got, ref, err_msg=str(kw))
        outs.append(out)
    return outs


def test_t5_greedy_and_beam_search_match_transformers(tiny):
    """T5 v1.1 (untied head, relative positions through the cache); EOS is a token the model emits,
    so rows end at different lengths and beams finish at different steps."""
    t = tiny("t5-v1.1", matrix_scale=0.3)  # weights that make varied generations
    ids, mask = sources(t.model.config)
    eos = an_emitted_token(t.model, ids, mask)
    outs = check_same_tokens(t, from_pretrained(t.path), [
        dict(num_beams=1), dict(num_beams=4, length_penalty=0.6, early_stopping=True),
        dict(num_beams=2, length_penalty=1.5, early_stopping="never")], eos)
    assert len(set(outs[0].tokens.ravel().tolist())) > 5  # not a constant stream
    assert (outs[0].lengths < NEW).any() and (outs[0].lengths == NEW).any()  # EOS stopped a row early
    assert len({tuple(o.tokens[0, :o.lengths[0]]) for o in outs}) > 1  # the settings choose differently


def test_bart_greedy_and_beam_search_match_transformers(tiny):
    """BART: the config's forced_eos_token_id (2) ends every row that reaches the length limit."""
    t = tiny("bart")
    outs = check_same_tokens(t, from_pretrained(t.path), [
        dict(num_beams=1), dict(num_beams=4, length_penalty=0.6, early_stopping=True)], eos=2)
    for out in outs:
        assert (out.lengths == NEW).all() and (out.tokens[:, NEW - 1] == 2).all()
        assert (out.tokens[:, :NEW - 1] != 2).all()


@pytest.mark.parametrize("variant", ("bart", "marian", "t5"))  # learned, sinusoidal, relative positions
def test_cached_decoding_equals_the_full_forward(tiny, variant):
    """Feeding the decoder one token at a time through the cache (self-attention slots, cross K/V
    computed once) gives the logits of one full forward pass: positions, masks and cache slots."""
    t = tiny(variant)
    model = from_pretrained(t.path)
    b = ts.batch(t.model.config, seed=6)
    dec = b["decoder_input_ids"][:, :5]
    full = np.asarray(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=dec).logits)
    enc, _ = model.encode(b["input_ids"], b["attention_mask"])
    cache = model.init_cache(enc, b["attention_mask"], 8)
    for step in range(dec.shape[1]):
        out = model.decode(dec[:, step:step + 1], np.ones((3, 1), np.int32), None, None, cache=cache, last_only=True)
        cache = out.past_key_values
        assert ts.max_diff(out.logits, full[:, step]) <= ts.ATOL, step
    assert int(cache.index) == 5 and cache.mask[:, :5].all() and not cache.mask[:, 5:].any()


def test_bad_settings_are_one_line(tiny):
    t = tiny("bart")
    model = from_pretrained(t.path)
    ids, mask = sources(t.model.config)
    for kw, msg in ((dict(num_beams=0), "num_beams must be >= 1"),
                    (dict(early_stopping="sometimes"), "early_stopping must be"),
                    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
                    (dict(max_new_tokens=60), "exceeds the model's 40 positions")):
        with pytest.raises(JaxtuneError, match=msg) as e:
            generate(model, ids, mask, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(JaxtuneError, match="source row 1 has no tokens"):
        generate(model, ids, mask * np.array([[1], [0], [1]]))


def test_source_padding_stops_at_the_position_table(tiny):
    """A 33-token source on a 40-position BART pads to 40, not to the next power of two (64 rows
    would read past the learned position table); the tokens are still transformers'."""
    t = tiny("bart")
    ids = np.random.default_rng(7).integers(3, 60, (2, 33))
    mask = np.ones_like(ids)
    ref = hf_generate(t.model, ids, mask, num_beams=1)
    out = generate(from_pretrained(t.path), ids, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(as_transformers_pads(out, 1, t.model.config.pad_token_id, 2), ref)
