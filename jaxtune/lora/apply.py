"""`apply(model, ...)`: LoRA on a jaxtune model, in place; what trains and what stays frozen.

    spec = jaxtune.lora.apply(model, rank=8, alpha=16)      # default targets / train_also per family
    trainable, frozen = jaxtune.lora.partition(model)         # plain dicts: adapters + head | the base

`targets` is a regex searched in each parameter path (`bert/encoder/layer/3/attention/self/query/
kernel`); every kernel it matches gets an adapter. `train_also` (regexes) names what trains in
full beside the adapters: by default the task head of a classifier, nothing for a language-model
head (its vocabulary matrix is pretrained and large). Mistakes are one-line ConfigErrors.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ConfigError
from jaxtune.lora.layers import LORA_LEAVES, adapt, frozen_dot_general, is_adapted
from jaxtune.lora.quant import KINDS, is_quantized, quantize
from jaxtune.models.pretrained import family_of
from jaxtune.models.trees import flatten, path_str, split, unflatten

# The attention and MLP projections of every layer: each family's kernels inside its layer list.
_LAYERS = {
    "bert": r"^.*encoder/layer/\d+/",
    "roberta": r"^.*encoder/layer/\d+/",
    "xlm-roberta": r"^.*encoder/layer/\d+/",
    "vit": r"^.*encoder/layer/\d+/",
    "distilbert": r"^.*transformer/layer/\d+/",
    "gpt2": r"^.*h/\d+/",
    "llama": r"^.*layers/\d+/",
    "mistral": r"^.*layers/\d+/",
    "qwen2": r"^.*layers/\d+/",
    "qwen3": r"^.*layers/\d+/",
}
# Heads whose weights are pretrained (language-model heads): not trained in full by default.
_LM_TASKS = ("causal-lm", "masked-lm")


@dataclass(frozen=True)
class LoRASpec:
    """What `apply` did: static (hashable), kept on the model as `model.lora_spec`."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple  # the adapted kernels' paths (tuples)
    train_also: tuple  # regexes
    base_dtype: Optional[str] = None  # QLoRA: the base's frozen matrices stored as 'int8' / 'nf4' (QTensor)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def trains(self, path: tuple) -> bool:
        """Whether the parameter at `path` is trained (an adapter or a train_also match)."""
        return path[-1] in LORA_LEAVES or any(re.search(r, path_str(path)) for r in self.train_also)


def default_targets(model_type: str) -> str:
    return _LAYERS.get(model_type, r"^.*layers?/\d+/") + r".*kernel$"


def default_train_also(model) -> tuple:
    """The task head (everything outside the base model) of a classifier; () for an LM head."""
    family = family_of(model)
    task = family.task_of(getattr(type(model), "hf_architecture", "")) or "base"
    if task in ("base", *_LM_TASKS):
        return ()
    heads = sorted({str(p[0]) for p in flatten(split(model)[1]) if str(p[0]) != family.base_prefix})
    return tuple(f"^{h}/" for h in heads)


def _compile(key: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"lora.{key}: invalid regex {pattern!r}: {e}") from None


def _shown(paths: Sequence[str], limit: int = 12) -> str:
    """Paths with layer numbers folded (`layer/N/`), deduplicated: what a pattern could match."""
    folded = list(dict.fromkeys(re.sub(r"/\d+/", "/N/", p) for p in paths))
    return ", ".join(folded[:limit]) + (f", ... ({len(folded)} in all)" if len(folded) > limit else "")


def _adaptable(module) -> bool:
    k = getattr(module, "kernel", None)
    return isinstance(k, nnx.Param) and k.ndim >= 2 and not isinstance(module, nnx.Conv)


def apply(model, *, rank: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
          targets: Optional[str] = None, train_also: Optional[Sequence[str]] = None, seed: int = 0,
          base_dtype: Optional[str] = None) -> LoRASpec:
    """Put LoRA adapters on `model`'s kernels matching `targets` (in place); returns the spec.

    `alpha` defaults to `2 * rank`; the adapters add `x @ A @ B * alpha / rank`; A starts random
    (seeded by `seed` and the path), B at zero, so the model's outputs do not change.
    `base_dtype` ('int8' / 'nf4', QLoRA): every frozen matrix of the base (see `quantize_frozen`)
    is replaced by its quantized QTensor (`jaxtune.lora.quant`), dequantized where it is used.
    """
    if getattr(model, "lora_spec", None) is not None:
        raise ConfigError("lora: the model already has adapters")
    alpha = 2.0 * rank if alpha is None else float(alpha)
    check(rank, alpha, dropout, base_dtype)
    hits, train_also, modules = select(model, targets, train_also)
    for i, path in enumerate(hits):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(path_str(path).encode()))
        adapt(modules[path[:-1]], rank=rank, alpha=alpha, dropout_rate=dropout, key=key, lora_id=i)
    spec = LoRASpec(rank, alpha, float(dropout), tuple(hits), train_also, base_dtype)
    if base_dtype is not None:
        quantize_frozen(modules, spec, base_dtype)
    # Frozen Linears that got no adapter (BERT's pooler) drop the CPU kernels' custom backward
    # too: it would compute their (unused) kernel gradient.
    for path, m in modules.items():
        if isinstance(m, nnx.Linear) and not spec.trains(path + ("kernel",)):
            m.dot_general = frozen_dot_general
    model.lora_spec = spec
    return spec


def quantize_frozen(modules: dict, spec: LoRASpec, kind: str) -> None:
    """QLoRA: store every frozen floating matrix (ndim >= 2) of the base as a QTensor of `kind`:
    the adapted kernels, and also the embeddings (a tied LM head's too), an untied LM head and
    frozen linears without adapters, which would otherwise keep a third of a small LM's base in
    float32. Vectors (norms, biases) and what trains stay float. Every use reads them through
    `param[...]` (nnx.Linear, nnx.Embed and its `attend`, the families' own layers), which
    dequantizes."""
    for path, m in modules.items():
        for name, var in list(vars(m).items()):
            if not isinstance(var, nnx.Param) or spec.trains(path + (name,)):
                continue
            value = var.get_value()
            if is_quantized(value) or value.ndim < 2 or not jnp.issubdtype(value.dtype, jnp.floating):
                continue  # a tied matrix is met twice: quantized once
            var.set_value(quantize(value, kind))


def select(model, targets: Optional[str] = None, train_also: Optional[Sequence[str]] = None):
    """(kernel paths to adapt, train_also regexes, {module path: module}), checked: every mistake
    is one ConfigError line. `model` may be abstract (`nnx.eval_shape`): a recipe is checked
    before any weight is read."""
    model_type = model.config.model_type
    targets = default_targets(model_type) if targets is None else targets
    train_also = default_train_also(model) if train_also is None else tuple(train_also)
    rx = _compile("targets", targets)

    params = flatten(split(model)[1])
    names = [path_str(p) for p in params]
    hits = [p for p, n in zip(params, names) if rx.search(n)]
    modules = {tuple(path): m for path, m in nnx.iter_modules(model)}
    kernels = [p + ("kernel",) for p, m in modules.items() if _adaptable(m)]
    if not hits:
        raise ConfigError(f"lora.targets: {targets!r} matches no parameter; it could match: "
                          f"{_shown([path_str(k) for k in kernels])}")
    bad = [p for p in hits if p[-1] != "kernel" or p[:-1] not in modules or not _adaptable(modules[p[:-1]])]
    if bad:
        shape = tuple(params[bad[0]].shape)
        raise ConfigError(f"lora.targets: {targets!r} matches {path_str(bad[0])} (shape {shape}), which is not "
                          f"the matrix of a linear layer; e.g. {_shown([path_str(k) for k in kernels], 3)}")
    for pattern in train_also:
        prx = _compile("train_also", pattern)
        matched = [p for p, n in zip(params, names) if prx.search(n)]
        if not matched:
            tops = list(dict.fromkeys("/".join(map(str, p[:2])) for p in params))
            raise ConfigError(f"lora.train_also: {pattern!r} matches no parameter; paths start with "
                              f"{', '.join(tops[:12])}")
        both = [p for p in matched if p in hits]
        if both:
            raise ConfigError(f"lora: {path_str(both[0])} is matched by both lora.targets and "
                              f"lora.train_also {pattern!r}; a kernel trains through adapters or in full")
    return hits, train_also, modules


def check(rank, alpha, dropout, base_dtype=None) -> None:
    """The lora settings' own rules (also run when a recipe is validated)."""
    if base_dtype is not None and base_dtype not in KINDS:
        raise ConfigError(f"lora.base_dtype must be one of {', '.join(KINDS)}, got {base_dtype!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora.rank must be a positive integer, got {rank!r}")
    if alpha < 0:
        raise ConfigError(f"lora.alpha must be >= 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {dropout!r}")


def spec_of(model) -> Optional[LoRASpec]:
    return getattr(model, "lora_spec", None)


# ---------------------------------------------------------------------------------------------
# The params of a LoRA model, split and merged (plain nested dicts)


def partition(model_or_spec, params: Optional[dict] = None) -> tuple[dict, dict]:
    """(trainable, frozen) params: adapters + train_also | everything else (the base)."""
    spec = model_or_spec if isinstance(model_or_spec, LoRASpec) else spec_of(model_or_spec)
    if params is None:
        params = split(model_or_spec)[1]
    flat = flatten(params)
    trainable = {p: v for p, v in flat.items() if spec.trains(p)}
    frozen = {p: v for p, v in flat.items() if not spec.trains(p)}
    return unflatten(trainable), unflatten(frozen)


def combine(trainable: dict, frozen: dict) -> dict:
    """The full params tree from its two parts."""
    return unflatten({**flatten(frozen), **flatten(trainable)})


def merged_params(spec: LoRASpec, params: dict) -> dict:
    """Params without adapters, each adapted kernel replaced by `W + scale * A @ B` (float32
    accumulation, cast back): what an export writes and transformers loads."""
    flat = flatten(params)
    # QLoRA: the dequantized base (what the model computed with)
    out = {p: (v.dequantize() if is_quantized(v) else v) for p, v in flat.items() if p[-1] not in LORA_LEAVES}
    for kpath in spec.targets:
        base = kpath[:-1]
        a, b, w = flat[base + ("lora_a",)], flat[base + ("lora_b",)], out[kpath]
        delta = jnp.tensordot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), axes=1)
        out[kpath] = (jnp.asarray(w, jnp.float32) + spec.scale * delta).astype(w.dtype)
    return unflatten(out)


def is_lora(model) -> bool:
    return spec_of(model) is not None or any(is_adapted(m) for _, m in nnx.iter_modules(model))


__all__ = ["LoRASpec", "apply", "check", "combine", "default_targets", "default_train_also", "is_lora",
           "merged_params", "partition", "quantize_frozen", "spec_of"]
