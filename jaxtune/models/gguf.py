"""GGUF checkpoints (llama.cpp's format) presented as a Hugging Face folder would be.

A `.gguf` file holds the weights (often quantized), the architecture's hyper-parameters and the
tokenizer (vocabulary, merges, chat template) in one file. This module gives the rest of jaxtune
what it reads from an HF folder:

    read_config(path)       the config.json dict (model_type llama / qwen2 / qwen3, sizes, rope, ids)
    GGUFCheckpoint(path)    `hf.CheckpointReader`'s interface under HF key names and PyTorch layout,
                            each tensor dequantized to float32 only when it is read
    load_tokenizer(path)    the fast tokenizer, chat template included (transformers builds it)

The file is memory-mapped; nothing is read into memory until a tensor is asked for, and then only
that tensor. Tensor names follow llama.cpp's (`blk.3.attn_q.weight`); `TENSOR_RULES` maps them to
transformers' (`model.layers.3.self_attn.q_proj.weight`). llama.cpp's converter permutes the rows of
the q and k projections of Llama-type models for its rotary layout; `_unpermute` undoes it exactly
as transformers' GGUF loader does (`LlamaTensorProcessor._reverse_permute_weights`). Qwen files are
written unpermuted.

A Mistral model converted by llama.cpp says `general.architecture = llama` (gguf has no `mistral`
architecture) and loads as llama: the same network, without a sliding window, as llama.cpp runs it.

Anything that cannot be read is one `ModelLoadError` line naming the file and, where there is one,
the tensor: a quantization type outside `SUPPORTED_TYPES`, a file cut short, a corrupt header.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

from jaxtune.errors import ModelLoadError

SUFFIX = ".gguf"
# general.architecture -> HF model_type (mirrors transformers' GGUF_CONFIG_MAPPING for these).
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
PERMUTED = ("llama", "mistral")  # q/k rows permuted by llama.cpp's converter
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

# llama.cpp tensor name -> HF key (regex, replacement), first match wins. `rope_freqs.weight`
# (llama3 rope scaling stored as a tensor) becomes config, not a weight.
TENSOR_RULES = [(re.compile(p), r) for p, r in (
    (r"^token_embd\.weight$", "model.embed_tokens.weight"),
    (r"^output_norm\.weight$", "model.norm.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^blk\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^blk\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^blk\.(\d+)\.attn_q\.(weight|bias)$", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"^blk\.(\d+)\.attn_k\.(weight|bias)$", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"^blk\.(\d+)\.attn_v\.(weight|bias)$", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"^blk\.(\d+)\.attn_output\.(weight|bias)$", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"^blk\.(\d+)\.attn_q_norm\.weight$", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"^blk\.(\d+)\.attn_k_norm\.weight$", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"^blk\.(\d+)\.ffn_gate\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^blk\.(\d+)\.ffn_up\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^blk\.(\d+)\.ffn_down\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
)]
ROPE_FREQS = "rope_freqs.weight"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file (by its suffix; it need not exist)."""
    return os.fspath(path).lower().endswith(SUFFIX)


def hf_name(gguf_name: str) -> Optional[str]:
    """The HF key of a llama.cpp tensor name (None: not a weight of the HF model)."""
    for pattern, repl in TENSOR_RULES:
        if pattern.match(gguf_name):
            return pattern.sub(repl, gguf_name)
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (per head: interleaved pairs -> two halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


# ---------------------------------------------------------------------------------------------
# the file


@functools.cache
def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """gguf's reader, checking each tensor's type and extent before it maps the tensor, so that
        a bad tensor is named rather than failing a reshape deep inside the reader."""

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise ModelLoadError(f"{self._path}: tensor '{name}' has unknown ggml type {int(raw_dtype[0])} "
                                         f"(supported: {', '.join(SUPPORTED_TYPES)})") from None
                if qtype.name not in SUPPORTED_TYPES:
                    raise ModelLoadError(f"{self._path}: tensor '{name}' is stored as {qtype.name}, which jaxtune "
                                         f"does not read (supported: {', '.join(SUPPORTED_TYPES)})")
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                n = int(np.prod(dims.astype(np.int64)))
                if n % block or (len(dims) and int(dims[0]) % block):
                    raise ModelLoadError(f"{self._path}: tensor '{name}': {n} {qtype.name} values do not fill "
                                         f"whole {block}-value blocks")
                begin = int(start_offs + offset[0])
                end = begin + n // block * type_size
                if end > size:
                    raise ModelLoadError(f"{self._path}: truncated GGUF file: tensor '{name}' needs bytes "
                                         f"{begin}-{end}, the file has {size}")
            super()._build_tensors(start_offs, fields)

        def __init__(self, path: Path):
            self._path = path
            super().__init__(path)

    return Reader


@functools.lru_cache(maxsize=2)
def _open(path: Path, size: int, mtime_ns: int):
    """The parsed file (cached per path and version: config, tokenizer and weights all read it;
    a memory map, so the cache holds no tensor data)."""
    try:
        return _reader_class()(path)
    except ModelLoadError:
        raise
    except Exception as e:  # gguf raises ValueError / IndexError / KeyError on a bad header
        head = "not a GGUF file" if "magic" in str(e) else "truncated or corrupt GGUF header"
        raise ModelLoadError(f"{path}: {head} ({_first_line(e)})") from None


def open_file(path: str | os.PathLike):
    """gguf's `GGUFReader` over `path`, checked (one-line errors), cached while the file is unchanged."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    if not p.is_file():
        raise ModelLoadError(f"{path}: not a file (expected a .gguf file)")
    return _open(p, st.st_size, st.st_mtime_ns)


def _fields(reader) -> dict:
    """Scalar and string metadata (arrays skipped: the vocabulary is the tokenizer's business)."""
    import gguf

    out = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        try:
            out[key] = field.contents()
        except Exception:  # a value gguf cannot decode is a value we do not need
            continue
    return out


# ---------------------------------------------------------------------------------------------
# config


def read_config(path: str | os.PathLike) -> dict:
    """The HF config.json dict of a GGUF file, from its metadata (and which tensors it holds)."""
    reader = open_file(path)
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture '{arch}' is not supported "
                             f"(supported: {', '.join(ARCHITECTURES)})")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    def need(key):
        if f"{arch}.{key}" not in meta:
            raise ModelLoadError(f"{path}: GGUF metadata lacks '{arch}.{key}'")
        return meta[f"{arch}.{key}"]

    names = {t.name for t in reader.tensors}
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = get("attention.key_length") or (get("rope.dimension_count") if arch in PERMUTED else None)
    vocab = get("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None and "token_embd.weight" in names:
        vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1])
    config = {
        "model_type": ARCHITECTURES[arch],
        "architectures": [HF_ARCHITECTURES[arch]],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(head_dim) if head_dim else hidden // heads,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": any(n.endswith(".attn_q.bias") for n in names),
    }
    if get("attention.sliding_window"):
        config["sliding_window"] = int(get("attention.sliding_window"))
        config["use_sliding_window"] = True
    scaling = _rope_scaling(path, reader, meta, arch, config)
    if scaling:
        config["rope_scaling"] = scaling
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[ours] = int(value)
    return {k: v for k, v in config.items() if v is not None}


def _rope_scaling(path, reader, meta: dict, arch: str, config: dict) -> Optional[dict]:
    """HF `rope_scaling` from `{arch}.rope.scaling.*`, or llama3 scaling recovered from the
    `rope_freqs.weight` tensor in which llama.cpp stores it."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        return _llama3_scaling(path, freqs, config, original)
    if kind in (None, "none") or not factor:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": float(factor)}
        if original:
            out["original_max_position_embeddings"] = int(original)
        return out
    raise ModelLoadError(f"{path}: rope scaling type '{kind}' is not supported (linear, yarn, llama3)")


def _llama3_scaling(path, tensor, config: dict, original) -> dict:
    """The llama3 rope parameters that reproduce `rope_freqs.weight` (per-frequency divisors):
    Llama 3.1 / 3.2 use low 1, high 4 and 8192 original positions; other values are refused."""
    import gguf

    divisors = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), np.float64).reshape(-1)
    factor = float(divisors.max())
    head_dim, theta = config["head_dim"], config["rope_theta"]
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    for orig in dict.fromkeys([int(original or 8192), 8192]):
        low, high = 1.0, 4.0
        wavelen = 2 * np.pi / inv
        smooth = (orig / wavelen - low) / (high - low)
        expect = np.where(wavelen < orig / high, 1.0,
                          np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if expect.shape == divisors.shape and np.allclose(expect, divisors, rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": orig}
    raise ModelLoadError(f"{path}: tensor '{ROPE_FREQS}' holds rope frequency factors that match no llama3 "
                         "scaling jaxtune knows (low_freq_factor 1, high_freq_factor 4)")


# ---------------------------------------------------------------------------------------------
# weights


class GGUFCheckpoint:
    """`hf.CheckpointReader`'s interface over a GGUF file: HF keys, PyTorch (out, in) layout,
    each tensor dequantized to float32 (and q/k unpermuted) when `get` asks for it."""

    def __init__(self, path: str | os.PathLike, config: Optional[dict] = None):
        self.path = Path(path)
        self.folder = self.path  # what load_weights names in its messages
        self._reader = open_file(path)
        config = config or read_config(path)
        self._arch = config["model_type"]
        self._heads = (config["num_attention_heads"], config["num_key_value_heads"])
        self._tensors = {}
        for t in self._reader.tensors:
            key = hf_name(t.name)
            if key is None and t.name == ROPE_FREQS:
                continue  # already in the config
            self._tensors[key or t.name] = t  # an unknown tensor keeps its name (reported as unused)
        types = sorted({t.tensor_type.name for t in self._reader.tensors})
        self.description = f"{self.path.name} ({', '.join(types)})"

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[key].shape))  # ggml lists dims innermost first

    def get(self, key: str) -> np.ndarray:
        import gguf

        t = self._tensors[key]
        try:
            w = gguf.dequantize(t.data, t.tensor_type).reshape(self.shape(key))
        except Exception as e:
            raise ModelLoadError(f"{self.path}: cannot read tensor '{t.name}' "
                                 f"({t.tensor_type.name}): {_first_line(e)}") from None
        if self._arch in PERMUTED and (".attn_q." in t.name or ".attn_k." in t.name):
            return _unpermute(w, self._heads[0] if ".attn_q." in t.name else self._heads[1])
        # F32 comes back as a read-only view of the memory map: hand out an array of our own.
        return w if w.flags.writeable else np.array(w)


# ---------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizer(path: str | os.PathLike):
    """The fast tokenizer (with the chat template) that transformers builds from the file's
    metadata; one-line error when it cannot."""
    from transformers import AutoTokenizer

    p = Path(path)
    reader = open_file(p)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ModelLoadError(f"{p}: the GGUF file holds no tokenizer (no tokenizer.ggml.tokens)")
    try:
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except Exception as e:  # ValueError / KeyError from transformers' converters
        raise ModelLoadError(f"{p}: transformers cannot build the tokenizer: {_first_line(e)}") from None


__all__ = ["GGUFCheckpoint", "SUPPORTED_TYPES", "hf_name", "is_gguf", "load_tokenizer", "open_file", "read_config"]
