"""PEFT's LoRA adapter folder: `adapter_config.json` + `adapter_model.safetensors`, both ways.

    save_peft(model, out_dir, params)   # a jaxtune LoRA model -> what peft.PeftModel.from_pretrained reads
    spec = load_peft(model, folder)     # a PEFT adapter onto a jaxtune base model (in place)

PEFT's layout (checked against peft 0.21 `save_pretrained`): keys `base_model.model.<HF module>.
lora_A.weight` of shape (r, in) and `.lora_B.weight` of shape (out, r), whatever the base layer;
the modules under `modules_to_save` (the trained head) are stored whole under their plain HF keys
`base_model.model.<HF module>.<param>`. The HF names come from the family's key table, so a layer
whose HF weight is stored (in, out) (GPT-2's Conv1D, fused c_attn included) is recognised by its
table's layout and written with `fan_in_fan_out: true`, as PEFT expects for Conv1D.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ModelLoadError
from jaxtune.lora.apply import LoRASpec, apply, spec_of
from jaxtune.lora.layers import LORA_LEAVES
from jaxtune.models.pretrained import family_of
from jaxtune.models.trees import flatten, path_str, split

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# jaxtune task -> PEFT task_type (what PeftModel.from_pretrained wraps the model as)
TASK_TYPES = {"sequence-classification": "SEQ_CLS", "token-classification": "TOKEN_CLS",
              "causal-lm": "CAUSAL_LM", "question-answering": "QUESTION_ANS", "base": "FEATURE_EXTRACTION"}


def _task(model) -> str:
    return family_of(model).task_of(getattr(type(model), "hf_architecture", "")) or "base"


def _kernel_layout(family, kpath: tuple, out_shape: tuple):
    """(HF module name, to_hf, from_hf, fan_in_fan_out) of the kernel at `kpath`. The layout is
    read off the key table: a 1-row kernel that comes out with 1 row is stored (in, out)."""
    key, to_hf, from_hf = family.to_hf_key(path_str(kpath))
    if not key.endswith(".weight"):
        raise AssertionError(f"{path_str(kpath)} maps to {key}, not a weight")
    fan_in_fan_out = to_hf(np.zeros((1, *out_shape), np.float32)).shape[0] == 1
    return key[: -len(".weight")], to_hf, from_hf, fan_in_fan_out


def _modules_to_save(family, spec: LoRASpec, flat: dict) -> dict:
    """{HF module: {HF key: jaxtune path}} of the modules that train in full (train_also)."""
    out: dict = {}
    for path in flat:
        if path[-1] in LORA_LEAVES or not spec.trains(path):
            continue
        key = family.to_hf_key(path_str(path))[0]
        out.setdefault(key.rsplit(".", 1)[0], {})
    for path in flat:  # the whole module, as PEFT's ModulesToSaveWrapper stores it
        if path[-1] in LORA_LEAVES:
            continue
        key = family.to_hf_key(path_str(path))[0]
        module = key.rsplit(".", 1)[0]
        if module in out:
            out[module][key] = path
    return out


def save_peft(model, out_dir, params: Optional[dict] = None, *, base_model: Optional[str] = None) -> Path:
    """Write `model`'s adapters (and its train_also modules as `modules_to_save`) as a PEFT folder;
    `params`: the model's full params (adapters + base) when not the model's own."""
    from safetensors.numpy import save_file

    spec = spec_of(model)
    if spec is None:
        raise ModelLoadError("save_peft: the model has no LoRA adapters")
    family = family_of(model)
    flat = flatten(split(model)[1] if params is None else params)
    host = {p: np.asarray(jax.device_get(v), np.float32) for p, v in flat.items()}
    tensors, modules, fan = {}, [], []
    for kpath in spec.targets:
        a, b = host[kpath[:-1] + ("lora_a",)], host[kpath[:-1] + ("lora_b",)]
        module, to_hf, _, ffio = _kernel_layout(family, kpath, b.shape[1:])
        hf_b = to_hf(b)  # B as the weight of an (r -> out) layer in this table's layout
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(hf_b.T if ffio else hf_b)
        modules.append(module)
        fan.append(ffio)
    to_save = _modules_to_save(family, spec, flat)
    for module, keys in to_save.items():
        for key, path in keys.items():
            tensors[PREFIX + key] = np.ascontiguousarray(family.to_hf_key(path_str(path))[1](host[path]))
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPES.get(_task(model)), "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": modules,
        "modules_to_save": sorted(to_save) or None, "fan_in_fan_out": any(fan), "bias": "none",
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
        (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_adapter(folder) -> tuple[dict, dict]:
    """(adapter_config, {key without base_model.model.: array}) of a PEFT LoRA folder; one-line errors."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise ModelLoadError(f"{folder} is not a PEFT adapter folder: no {CONFIG}")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except ValueError as e:
        raise ModelLoadError(f"{folder / CONFIG}: not JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise ModelLoadError(f"{folder / CONFIG}: peft_type {config.get('peft_type')!r}; jaxtune reads LORA adapters")
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                               "target_parameters", "trainable_token_indices") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']}")
    if unsupported:
        raise ModelLoadError(f"{folder / CONFIG}: {', '.join(unsupported)} not supported (plain LoRA only)")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"{folder} is not a PEFT adapter folder: no {WEIGHTS}")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # a truncated / foreign file: safetensors' own message, on one line
        raise ModelLoadError(f"{weights}: cannot read ({str(e).splitlines()[0]})") from None
    return config, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def load_peft(model, folder, *, seed: int = 0) -> LoRASpec:
    """Put the PEFT adapter in `folder` on `model` (a jaxtune model of its base, in place): adapters
    with its rank / alpha / dropout on its target modules, its modules_to_save as train_also, all
    with its values. A folder that does not fit the model is one ModelLoadError line."""
    config, tensors = read_adapter(folder)
    family = family_of(model)
    flat = flatten(split(model)[1])
    modules = {tuple(p): m for p, m in nnx.iter_modules(model)}
    by_module = {}  # HF module -> (kernel path, from_hf, fan_in_fan_out) of every matrix
    for p, m in modules.items():
        k = getattr(m, "kernel", None)
        if isinstance(k, nnx.Param) and k.ndim >= 2 and p + ("kernel",) in flat:
            module, _, from_hf, ffio = _kernel_layout(family, p + ("kernel",), tuple(k.shape[1:]))
            by_module[module] = (p + ("kernel",), from_hf, ffio)
    adapted = sorted({k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
    if not adapted:
        raise ModelLoadError(f"{folder}: no lora_A weights in {WEIGHTS}")
    missing = [m for m in adapted if m not in by_module]
    if missing:
        raise ModelLoadError(f"{folder}: adapter module {missing[0]} is not a matrix of this "
                             f"{family.model_type} model ({len(missing)} such); is it the adapter of another base?")
    hf_params = {family.to_hf_key(path_str(p))[0]: p for p in flat}
    saved = [k for k in tensors if ".lora_A." not in k and ".lora_B." not in k]
    unknown = [k for k in saved if k not in hf_params]
    if unknown:
        raise ModelLoadError(f"{folder}: {unknown[0]} is not a parameter of this {family.model_type} model")
    targets = "^(" + "|".join(re.escape(path_str(by_module[m][0])) for m in adapted) + ")$"
    train_also = tuple(f"^{re.escape(path_str(hf_params[k]))}$" for k in saved)
    spec = apply(model, rank=int(config["r"]), alpha=float(config.get("lora_alpha", 8)),
                 dropout=float(config.get("lora_dropout", 0.0)), targets=targets, train_also=train_also, seed=seed)
    values = {}
    for m in adapted:
        kpath, from_hf, ffio = by_module[m]
        a = tensors[f"{m}.lora_A.weight"].T
        b_hf = tensors.get(f"{m}.lora_B.weight")
        if b_hf is None:
            raise ModelLoadError(f"{folder}: {m}.lora_B.weight is missing")
        values[kpath[:-1] + ("lora_a",)] = a
        values[kpath[:-1] + ("lora_b",)] = from_hf(b_hf.T if ffio else b_hf)
    for k in saved:
        values[hf_params[k]] = family.to_hf_key(path_str(hf_params[k]))[2](tensors[k])
    _assign(model, values, folder)
    return spec


def _assign(model, values: dict, folder) -> None:
    """Set the model's params at `values`' paths in place (shapes checked; dtype and sharding kept)."""
    modules = {tuple(p): m for p, m in nnx.iter_modules(model)}
    for path, v in values.items():
        var = getattr(modules[path[:-1]], path[-1])
        old = var[...]
        if tuple(v.shape) != tuple(old.shape):
            raise ModelLoadError(f"{folder}: {path_str(path)} has shape {tuple(v.shape)} in the adapter, "
                                 f"{tuple(old.shape)} in this model; is it the adapter of another base?")
        arr = np.asarray(v).astype(old.dtype)
        sharding = getattr(old, "sharding", None)
        var.value = jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)


__all__ = ["CONFIG", "TASK_TYPES", "WEIGHTS", "load_peft", "read_adapter", "save_peft"]
