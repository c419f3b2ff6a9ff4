"""Model configs: the fields every family shares and the round trip to HF's config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar, Optional

import jax.numpy as jnp

from jaxtune.errors import ModelLoadError
from jaxtune.models.activations import activation

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Keys HF writes into every config.json that are not architecture hyper-parameters.
_HF_BOOKKEEPING = {
    "architectures",
    "model_type",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
}


@dataclass(frozen=True)
class ConfigBase:
    """Fields every family config has; families subclass it with their HF fields.

    Frozen and hashable (it lives in the model's static graph). HF fields a family does not model
    are kept in `extra` (JSON strings) so that export writes them back unchanged.
    """

    model_type: ClassVar[str] = ""
    # HF field name -> our field name, for families whose HF names differ from ours.
    hf_aliases: ClassVar[dict[str, str]] = {}
    # transformers' `attribute_map`: a generic name (hidden_size, num_hidden_layers,
    # num_attention_heads, ...) -> this family's field, so generic code reads any family.
    attribute_map: ClassVar[dict[str, str]] = {}
    # Fields naming an activation (checked when the config is made).
    activation_fields: ClassVar[tuple[str, ...]] = ("hidden_act",)

    num_labels: int = 2
    id2label: Optional[tuple[str, ...]] = None
    problem_type: Optional[str] = None
    dtype: str = "float32"  # parameter dtype
    compute_dtype: Optional[str] = None  # None: same as dtype
    remat: bool = False
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        """The checks every family shares: heads divide the width; activations exist."""
        width, heads = self.hidden_size, self.num_attention_heads
        if width % heads:
            name = self.attribute_map.get
            raise ModelLoadError(f"{name('hidden_size', 'hidden_size')} {width} is not a multiple of "
                                 f"{name('num_attention_heads', 'num_attention_heads')} {heads}")
        for field in self.activation_fields:
            activation(getattr(self, field))  # fail early on an unknown activation

    def __getattr__(self, name: str):  # only called when normal lookup fails
        field = type(self).attribute_map.get(name)
        if field is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute '{name}'")
        return getattr(self, field)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def param_dtype(self):
        return DTYPES[self.dtype]

    @property
    def activation_dtype(self):
        return DTYPES[self.compute_dtype or self.dtype]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.id2label or tuple(f"LABEL_{i}" for i in range(self.num_labels))

    @classmethod
    def dropout_overrides(cls, rate: Optional[float]) -> dict:
        """`model.dropout` spread over every dropout probability of the architecture (fields
        named `*dropout*` or `*pdrop*`), except a task head's own `classifier_dropout`; {} for
        None."""
        if rate is None:
            return {}
        return {f.name: rate for f in dataclasses.fields(cls)
                if ("dropout" in f.name or "pdrop" in f.name) and f.name != "classifier_dropout"}

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "ConfigBase":
        """Build from a config.json dict; `overrides` (our field names) win; None is ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, extra = {}, {}
        for key, value in hf.items():
            name = cls.hf_aliases.get(key, key)
            if name in names and name not in ("id2label", "extra", "num_labels", "dtype"):
                kwargs[name] = tuple(value) if isinstance(value, list) else value
            elif key not in _HF_BOOKKEEPING:
                extra[key] = json.dumps(value)
        id2label = hf.get("id2label")
        if id2label:
            kwargs["id2label"] = tuple(id2label[k] for k in sorted(id2label, key=int))
            kwargs["num_labels"] = len(id2label)
        elif hf.get("num_labels"):
            kwargs["num_labels"] = hf["num_labels"]
        if "problem_type" in hf:
            kwargs["problem_type"] = hf["problem_type"]
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "id2label" in overrides:
            overrides["id2label"] = tuple(overrides["id2label"])
            overrides.setdefault("num_labels", len(overrides["id2label"]))
        if "num_labels" in overrides and "id2label" not in overrides:
            if kwargs.get("id2label") and len(kwargs["id2label"]) != overrides["num_labels"]:
                kwargs["id2label"] = None
        kwargs.update(overrides)
        kwargs["extra"] = tuple(sorted(extra.items()))
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The config.json dict transformers expects (our fields under their HF names)."""
        ours = {"num_labels", "id2label", "problem_type", "dtype", "compute_dtype", "remat", "extra"}
        to_hf_name = {v: k for k, v in self.hf_aliases.items()}
        out = {"model_type": self.model_type}
        for f in dataclasses.fields(self):
            if f.name not in ours:
                value = getattr(self, f.name)
                out[to_hf_name.get(f.name, f.name)] = list(value) if isinstance(value, tuple) else value
        for key, value in self.extra:
            out.setdefault(key, json.loads(value))
        labels = self.labels
        out["id2label"] = {str(i): name for i, name in enumerate(labels)}
        out["label2id"] = {name: i for i, name in enumerate(labels)}
        if self.problem_type:
            out["problem_type"] = self.problem_type
        out["dtype"] = self.dtype
        return out


@dataclass(frozen=True)
class EncoderConfig(ConfigBase):
    """The BERT-style fields (and transformers' defaults) that BERT, RoBERTa and ViT configs share."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
