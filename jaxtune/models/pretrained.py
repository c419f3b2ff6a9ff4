"""Load HF checkpoints into jaxtune models and export them back.

Loading never random-initialises first: the model is built abstractly (`nnx.eval_shape`), each
parameter is read from the checkpoint, converted, cast and placed on its sharding as it is read.
Only parameters the checkpoint lacks and that may start fresh (task heads, pooler) are initialised,
in one jitted call that computes nothing else. Every missing, unexpected or mis-shaped key is
collected and reported together.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxtune.errors import ModelLoadError
from jaxtune.models import hf
from jaxtune.models.config import ConfigBase
from jaxtune.models.family import LEGACY_RENAMES, Family
from jaxtune.models.trees import abstract_model, batch_stats, flatten, logical_axes, merge, path_str, split, unflatten

log = logging.getLogger("jaxtune")

# HF model_type -> module defining FAMILY. A family lands here once its parity tests pass.
# A module serving several model_types maps each to its Family in a `FAMILIES` dict.
REGISTRY = {
    "bert": "jaxtune.models.bert",
    "distilbert": "jaxtune.models.distilbert",
    "gpt2": "jaxtune.models.gpt2",
    "llama": "jaxtune.models.llama",
    "mistral": "jaxtune.models.llama",
    "qwen2": "jaxtune.models.llama",
    "qwen3": "jaxtune.models.llama",
    "resnet": "jaxtune.models.resnet",
    "timm_resnet": "jaxtune.models.resnet",  # timm folders (jaxtune.models.timm_folder)
    "timm_vgg": "jaxtune.models.vgg",
    "bart": "jaxtune.models.bart",
    "marian": "jaxtune.models.bart",
    "mt5": "jaxtune.models.t5",
    "roberta": "jaxtune.models.roberta",
    "xlm-roberta": "jaxtune.models.roberta",
    "t5": "jaxtune.models.t5",
    "vit": "jaxtune.models.vit",
    "wav2vec2": "jaxtune.models.wav2vec2",
    "hubert": "jaxtune.models.wav2vec2",
}


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def get_family(model_type: Optional[str], where: Optional[str | os.PathLike] = None) -> Family:
    """The family of an HF `model_type`; `where` (the config.json it came from) heads the error."""
    if not isinstance(model_type, str) or model_type not in REGISTRY:
        head = f"{where}: " if where else ""
        what = "no model_type" if model_type is None else f"unsupported model_type '{model_type}'"
        raise ModelLoadError(f"{head}{what}; supported: {', '.join(supported_model_types())}")
    module = importlib.import_module(REGISTRY[model_type])
    return getattr(module, "FAMILIES", {}).get(model_type) or module.FAMILY


def family_of(model: nnx.Module) -> Family:
    return get_family(model.config.model_type)


Shardings = Optional[Any]  # None | dict of Sharding shaped like the params | callable(abstract model)


def _shardings_for(shardings: Shardings, abstract: nnx.Module) -> Optional[dict]:
    if shardings is None:
        return None
    if callable(shardings):
        shardings = shardings(abstract)
    return flatten(shardings)


def place(array: np.ndarray, sharding) -> jax.Array:
    """Put a host array on its sharding; each device (and host) gets only its slice."""
    if sharding is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def make_config(
    family: Family, hf_config: dict, *, config_overrides: Optional[dict] = None, **overrides
) -> ConfigBase:
    merged = {**hf_config, **(config_overrides or {})}
    try:
        return family.config_cls.from_hf(merged, **overrides)
    except TypeError as e:  # a config.json field of the wrong kind
        raise ModelLoadError(f"config for {family.model_type} does not validate: {e}")


def _resolve_task(family: Family, hf_config: dict, task: Optional[str]) -> str:
    if task is not None:
        family.head(task)  # raises a clear error when unsupported
        return task
    for arch in hf_config.get("architectures") or ():
        found = family.task_of(arch)
        if found:
            return found
    return "base"


def labels_differ(hf_config: dict, num_labels: Optional[int]) -> bool:
    """Whether a checkpoint's head was trained for another label count than `num_labels` (then
    `from_pretrained(..., ignore_mismatched_sizes=True)` gives it a new, initialised head)."""
    ckpt_labels = len(hf_config.get("id2label") or {}) or hf_config.get("num_labels")
    return bool(num_labels and ckpt_labels and ckpt_labels != num_labels)


def from_pretrained(
    path_or_id: str | os.PathLike,
    task: Optional[str] = None,
    *,
    num_labels: Optional[int] = None,
    id2label: Optional[list[str] | dict] = None,
    problem_type: Optional[str] = None,
    dtype: Optional[str] = None,
    compute_dtype: Optional[str] = None,
    remat: Optional[bool] = None,
    config_overrides: Optional[dict] = None,
    shardings: Shardings = None,
    ignore_mismatched_sizes: bool = False,
    seed: int = 0,
    output_loading_info: bool = False,
):
    """Load an HF folder (or cached hub id, or a `.gguf` file) as a jaxtune model for `task`.

    `task`: 'base', 'sequence-classification', 'token-classification', 'masked-lm', ... (None: from
    the checkpoint's `architectures`). `shardings`: None (default device), a dict of Shardings shaped
    like the params, or a function of the abstract model returning one. `ignore_mismatched_sizes`
    re-initialises parameters whose shape differs (a 2-label head loaded for 3 labels).
    `output_loading_info=True` returns `(model, info)` as transformers does; `info['fresh']` lists
    the param paths initialised from scratch (L2-SP decays those toward zero).
    """
    folder = hf.resolve_model_dir(path_or_id)
    hf_config = hf.read_config(folder)
    family = get_family(hf_config.get("model_type"), hf.config_source(folder))
    task = _resolve_task(family, hf_config, task)
    if isinstance(id2label, dict):
        id2label = [id2label[k] for k in sorted(id2label, key=int)]
    config = make_config(
        family,
        hf_config,
        config_overrides=config_overrides,
        num_labels=num_labels,
        id2label=id2label,
        problem_type=problem_type,
        dtype=dtype,
        compute_dtype=compute_dtype,
        remat=remat,
    )
    reader = hf.open_checkpoint(folder, hf_config)
    model, info = load_weights(family, task, config, reader, shardings=shardings,
                               ignore_mismatched_sizes=ignore_mismatched_sizes, seed=seed)
    return (model, info) if output_loading_info else model


def load_weights(
    family: Family,
    task: str,
    config: ConfigBase,
    reader: hf.CheckpointReader,
    *,
    shardings: Shardings = None,
    ignore_mismatched_sizes: bool = False,
    seed: int = 0,
) -> tuple[nnx.Module, dict]:
    """Fill an abstract `family.head(task)` from `reader`; returns (model, loading info)."""
    cls = family.head(task)
    abstract = _abstract(cls, config, seed)
    graphdef, abs_params, rest = split(abstract)
    flat_abs = flatten(abs_params)
    flat_stats = flatten(batch_stats(abstract))  # BatchNorm running statistics: read like params
    flat_sh = _shardings_for(shardings, abstract)

    # Checkpoint keys, with legacy names normalised, and the base-model prefix reconciled:
    # a BertModel checkpoint has no 'bert.' prefix, a head checkpoint does (as in transformers).
    ckpt = {}
    for key in reader.keys():
        norm = key
        for pattern, repl in LEGACY_RENAMES:
            norm = pattern.sub(repl, norm)
        ckpt[norm] = key
    prefix = family.base_prefix + "."
    model_has_prefix = task != "base"
    ckpt_has_prefix = any(k.startswith(prefix) for k in ckpt)

    def ckpt_key(hf_key: str) -> str:
        if model_has_prefix and not ckpt_has_prefix and hf_key.startswith(prefix):
            return hf_key[len(prefix):]
        if not model_has_prefix and ckpt_has_prefix:
            return prefix + hf_key
        return hf_key

    loaded, missing, mismatched, used = {}, [], [], set()
    for path, abs_leaf in {**flat_abs, **flat_stats}.items():
        hf_key, to_hf, from_hf = family.to_hf_key(path_str(path))
        key = ckpt_key(hf_key)
        if key not in ckpt:
            missing.append((path, key))
            continue
        used.add(key)
        array = from_hf(reader.get(ckpt[key]))
        if tuple(array.shape) != tuple(abs_leaf.shape):
            # Both shapes in the checkpoint's layout (PyTorch (out, in) for kernels).
            expected = to_hf(np.broadcast_to(np.zeros((), np.int8), abs_leaf.shape)).shape
            mismatched.append((path, key, reader.shape(ckpt[key]), tuple(expected)))
            continue
        array = np.asarray(array, dtype=abs_leaf.dtype)
        loaded[path] = place(array, flat_sh.get(path) if flat_sh else None)  # statistics: default device

    fresh_ok = [p for p, _ in missing if any(re.search(r, path_str(p)) for r in family.new_ok)]
    not_ok = [k for p, k in missing if p not in fresh_ok]
    problems = []
    if mismatched and not ignore_mismatched_sizes:
        problems.append(
            "shape mismatch: "
            + "; ".join(f"{k}: checkpoint {c} vs model {m}" for _, k, c, m in mismatched)
            + " (ignore_mismatched_sizes=True re-initialises them)"
        )
    if not_ok:
        problems.append(f"missing from the checkpoint: {', '.join(not_ok)}")
    if problems:
        raise ModelLoadError(
            f"{reader.folder} does not fit {cls.__name__}: {' | '.join(problems)}"
        )

    fresh = fresh_ok + [p for p, *_ in mismatched]
    if fresh:
        loaded.update(_init_subset(cls, config, fresh, flat_sh, seed))
        log.warning(
            "%s: initialised from scratch (not in %s): %s; train them before use",
            cls.__name__,
            reader.folder.name,
            ", ".join(family.to_hf_key(path_str(p))[0] for p in fresh),
        )
    ignored = [k for k in ckpt if k not in used and any(re.search(r, k) for r in family.ignore_keys)]
    unexpected = [k for k in ckpt if k not in used and k not in ignored]
    if unexpected:
        log.warning(
            "%s: %d checkpoint weights unused by %s: %s",
            reader.folder.name,
            len(unexpected),
            cls.__name__,
            ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""),
        )
    info = {
        "fresh": fresh,
        "missing_keys": [k for _, k in missing],
        "unexpected_keys": unexpected,
        "mismatched_keys": [k for _, k, *_ in mismatched],
    }
    stats = unflatten({p: loaded.pop(p) for p in flat_stats})
    model = merge(graphdef, unflatten(loaded), rest)
    if stats:
        nnx.update(model, stats)
    return model, info


@functools.lru_cache(maxsize=16)
def _abstract(cls, config, seed: int) -> nnx.Module:
    """`abstract_model`, cached: tracing the initialisers costs more than reading small checkpoints.

    Only `split` and shardings functions see it; nothing mutates it.
    """
    return abstract_model(cls, config, seed)


@functools.lru_cache(maxsize=16)
def _subset_initializer(cls, config, seed: int, paths: tuple, out_shardings: Optional[tuple]):
    def init():
        flat = flatten(split(cls(config, rngs=nnx.Rngs(seed)))[1])
        return [flat[p] for p in paths]

    return jax.jit(init, out_shardings=list(out_shardings) if out_shardings else None)


def _init_subset(cls, config, paths: list[tuple], flat_sh: Optional[dict], seed: int) -> dict:
    """Initialise only `paths` of a fresh model: XLA drops the rest of the initialisation."""
    out_shardings = tuple(flat_sh[p] for p in paths) if flat_sh else None
    values = _subset_initializer(cls, config, seed, tuple(paths), out_shardings)()
    return dict(zip(paths, values))


def from_config(
    config: dict | ConfigBase,
    task: str = "base",
    *,
    shardings: Shardings = None,
    seed: int = 0,
    **overrides,
) -> nnx.Module:
    """A randomly initialised model from an HF-style config dict (with `model_type`) or a Config."""
    if isinstance(config, ConfigBase):
        family = get_family(config.model_type)
    else:
        family = get_family(config.get("model_type"))
        config = make_config(family, config, **overrides)
    cls = family.head(task)
    if shardings is None:  # eagerly: per-op kernels are cached across calls, a jit is not
        return cls(config, rngs=nnx.Rngs(seed))
    abstract = abstract_model(cls, config, seed)
    graphdef, _, rest = split(abstract)
    flat_sh = _shardings_for(shardings, abstract)

    def init():
        return split(cls(config, rngs=nnx.Rngs(seed)))[1]

    params = jax.jit(init, out_shardings=unflatten(flat_sh) if flat_sh else None)()
    model = merge(graphdef, params, rest)
    if batch_stats(abstract):  # BatchNorm statistics: their initial values (XLA drops the rest), default device
        nnx.update(model, jax.jit(lambda: batch_stats(cls(config, rngs=nnx.Rngs(seed))))())
    return model


def _to_host(array: jax.Array) -> np.ndarray:
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def export_tensors(model: nnx.Module, params: Optional[dict] = None,
                   stats: Optional[dict] = None) -> dict[str, np.ndarray]:
    """The HF state dict (numpy, PyTorch layout) of `model`, or of `params` in its structure;
    BatchNorm statistics from `stats` (a TrainState's `model_state`) or the model's own."""
    family = family_of(model)
    if params is None:
        _, params, _ = split(model)
    if stats is None:
        stats = batch_stats(model)
    tensors = {}
    for path, array in {**flatten(params), **flatten(stats)}.items():
        hf_key, to_hf, _ = family.to_hf_key(path_str(path))
        host = _to_host(array)
        if np.issubdtype(host.dtype, np.integer):  # a BatchNorm's num_batches_tracked: int64 in PyTorch
            host = host.astype(np.int64)
        elif host.dtype not in (np.float32, np.float16, jnp.bfloat16):
            host = host.astype(np.float32)
        tensors[hf_key] = to_hf(host)
    return tensors


def checkpoint_config(model: nnx.Module) -> dict:
    """The config.json an export writes: transformers', or the format the model's checkpoint came
    in when its config says how (`to_checkpoint_config`: timm's for timm models)."""
    if hasattr(model.config, "to_checkpoint_config"):
        return model.config.to_checkpoint_config(type(model))
    config = model.config.to_hf()
    config["architectures"] = [type(model).hf_architecture]
    return config


def save_pretrained(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    params: Optional[dict] = None,
    batch_stats: Optional[dict] = None,
) -> Path:
    """Write `config.json` + `model.safetensors` (+ tokenizer) that transformers loads (a model read
    from a timm folder: the folder timm loads, `jaxtune.models.timm_folder`).

    `tokenizer`: an HF tokenizer / processor object (its `save_pretrained` is called), a folder to
    copy tokenizer files from, or a `.gguf` file whose tokenizer (and chat template) is written.
    `params` (optional) replaces the model's own parameters, e.g. the params of a TrainState. Only
    JAX process 0 writes. `batch_stats` (optional) replaces the model's BatchNorm statistics.
    """
    out = Path(out_dir)
    tensors = export_tensors(model, params, batch_stats)
    if jax.process_index() != 0:
        return out
    config = checkpoint_config(model)
    hf.write_safetensors(tensors, out)
    hf.write_config(config, out)
    if tokenizer is not None:
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(out))
        else:
            hf.copy_tokenizer_files(hf.resolve_model_dir(tokenizer), out)
    return out


__all__ = [
    "REGISTRY",
    "export_tensors",
    "family_of",
    "from_config",
    "from_pretrained",
    "get_family",
    "labels_differ",
    "logical_axes",
    "place",
    "save_pretrained",
    "supported_model_types",
]
