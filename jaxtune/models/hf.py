"""Hugging Face checkpoint I/O: find the folder, read tensors lazily, write an HF folder back.

Reading supports a single `model.safetensors`, sharded safetensors (`model.safetensors.index.json`)
and `pytorch_model.bin` (torch only if installed). Nothing here knows about model families.

A `.gguf` file stands in for a whole folder: `resolve_model_dir` returns the file itself, and
`read_config`, `open_checkpoint` and `config_source` read it through `jaxtune.models.gguf`. A timm
folder (config.json with `architecture`, no `model_type`) reads like an HF one: `read_config`
translates its config (`jaxtune.models.timm_folder`); its weights carry the timm families' keys.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxtune.errors import ModelLoadError
from jaxtune.models import gguf as gguf_io, timm_folder
from jaxtune.models.gguf import is_gguf
from jaxtune.paths import resolve_path

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# Files that hold a tokenizer's vocabulary: without one, transformers builds an empty tokenizer
# (every word [UNK]) from config.json's model_type alone.
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "added_tokens.json",
    "tokenizer.model",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local folder, `pkg:PACKAGE/path`, or an HF hub id found in the local HF cache; a `.gguf`
    file (local or `pkg:`) is returned as it is, checked to exist."""
    s = os.fspath(path_or_id)
    path = resolve_path(s)
    if is_gguf(path):
        if path.is_file():
            return path
        raise ModelLoadError(f"GGUF file not found: {path}" if not path.exists() else f"{path}: not a file")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: no config.json in the model folder")
        return path
    looks_like_id = not s.startswith(("/", ".", "~", "pkg:")) and s.count("/") <= 1
    if looks_like_id:
        cached = _from_hf_cache(s)
        if cached is not None:
            return cached
        raise ModelLoadError(
            f"model '{s}' is neither a local folder nor in the local Hugging Face cache "
            f"(offline: download it once with `huggingface-cli download {s}` on a connected machine)"
        )
    if path.exists():
        raise ModelLoadError(f"{path}: not a folder (expected an HF model folder with config.json)")
    raise ModelLoadError(f"model folder not found: {path}")


def _from_hf_cache(repo_id: str) -> Path | None:
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, malformed id, or hub library missing: not found either way
        return None
    return folder if (folder / "config.json").is_file() else None


def config_source(folder: Path) -> Path:
    """The file a model's config comes from: config.json, or the GGUF file itself."""
    return folder if is_gguf(folder) else folder / "config.json"


def read_config(folder: Path) -> dict:
    if is_gguf(folder):
        return gguf_io.read_config(folder)
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    if timm_folder.is_timm_config(config):  # timm's config.json: as jaxtune's timm families read it
        return timm_folder.as_jaxtune_config(config, path)
    return config


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint folder: `keys()`, `shape(k)`, `get(k)`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._where: dict[str, Path] = {}  # key -> file
        self._handles: dict[Path, object] = {}
        self._torch: dict[str, np.ndarray] | None = None
        if (folder / SAFETENSORS).is_file():
            self._index_safetensors([folder / SAFETENSORS])
        elif (folder / SAFETENSORS_INDEX).is_file():
            self._index_safetensors(self._sharded_files(folder / SAFETENSORS_INDEX))
        elif (folder / TORCH_BIN).is_file() or (folder / TORCH_BIN_INDEX).is_file():
            self._load_torch(folder)
        else:
            raise ModelLoadError(
                f"{folder}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN})"
            )
        self.description = ", ".join(sorted({p.name for p in self._where.values()}))

    def _sharded_files(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})")
        files = sorted({index.parent / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index}: names {f.name}, which is missing")
        return files

    def _index_safetensors(self, files: list[Path]) -> None:
        for f in files:
            size = f.stat().st_size
            try:
                handle = safe_open(str(f), framework="numpy")
                keys = list(handle.keys())
            except Exception as e:  # SafetensorError is not exported under a stable name
                raise ModelLoadError(f"{f}: truncated or corrupt safetensors file ({e})")
            # The header may be intact while the data section is cut short: check its length.
            with f.open("rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(header_len))
            data_end = max(
                (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
            )
            if 8 + header_len + data_end > size:
                raise ModelLoadError(
                    f"{f}: truncated safetensors file ({size} bytes, header promises {8 + header_len + data_end})"
                )
            self._handles[f] = handle
            for k in keys:
                self._where[k] = f

    def _load_torch(self, folder: Path) -> None:
        try:
            import torch
        except ImportError:
            raise ModelLoadError(
                f"{folder}: weights are in {TORCH_BIN}, which needs PyTorch to read; "
                "pip install torch, or convert the folder to safetensors"
            )
        if (folder / TORCH_BIN_INDEX).is_file():
            weight_map = json.loads((folder / TORCH_BIN_INDEX).read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = [folder / TORCH_BIN]
        self._torch = {}
        for f in files:
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True)
            except Exception as e:
                raise ModelLoadError(f"{f}: cannot read PyTorch checkpoint ({e})")
            for k, v in sd.items():
                self._torch[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        if self._torch is not None:
            return tuple(self._torch[key].shape)
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        if self._torch is not None:
            return self._torch[key]
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except Exception as e:
            raise ModelLoadError(f"{self._where[key]}: cannot read tensor '{key}' ({e})")


def open_checkpoint(folder: Path, config: dict | None = None):
    """The lazy tensor reader of a model folder or GGUF file (`keys`, `shape`, `get`)."""
    if is_gguf(folder):
        return gguf_io.GGUFCheckpoint(folder, config)
    return CheckpointReader(folder)


def write_safetensors(tensors: dict[str, np.ndarray], folder: Path, metadata: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (SAFETENSORS + ".tmp")
    save_file(
        # reshape: ascontiguousarray makes a 0-d tensor (BatchNorm's num_batches_tracked) 1-d
        {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()},
        str(tmp),
        metadata={"format": "pt", **(metadata or {})},
    )
    os.replace(tmp, folder / SAFETENSORS)  # never leave a half-written weights file


def write_config(config: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer / preprocessor files from a model folder; returns the names copied. From a
    GGUF file: the tokenizer transformers builds from it, saved (tokenizer.json, chat template)."""
    if is_gguf(src):
        before = set(os.listdir(dst)) if dst.is_dir() else set()
        gguf_io.load_tokenizer(src).save_pretrained(str(dst))
        return sorted(set(os.listdir(dst)) - before)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
