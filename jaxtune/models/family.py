"""The family record: how one HF architecture's checkpoints map onto jaxtune modules.

A family folder's `__init__.py` is one `define(...)` call; its `params.py` holds the key table
(`KEY_RULES`, `IGNORE_KEYS`, `NEW_OK`) tried before `DEFAULT_RULES`.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Optional

import numpy as np

from jaxtune.errors import ModelLoadError
from jaxtune.models.trees import flatten, unflatten


@dataclass(frozen=True)
class KeyRule:
    """One row of a key table: a jaxtune path regex -> HF key template, with array transforms.

    Paths are '/'-joined (`bert/encoder/layer/0/attention/self/query/kernel`). The first rule whose
    `pattern` matches wins; `hf` is an `re.sub` template; `to_hf`/`from_hf` convert the array.
    """

    pattern: str
    hf: str
    to_hf: Callable[[np.ndarray], np.ndarray] = lambda a: a
    from_hf: Callable[[np.ndarray], np.ndarray] = lambda a: a


def _t(a):
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


# Linear kernels are (in, out) here and (out, in) in PyTorch.
DEFAULT_RULES = (
    KeyRule(r"^(.*)/kernel$", r"\1/weight", _t, _t),
    KeyRule(r"^(.*)/embedding$", r"\1/weight"),
    KeyRule(r"^(.*)/scale$", r"\1/weight"),
    KeyRule(r"^(.*)$", r"\1"),
)

# Checkpoint key renames older HF checkpoints need (as transformers does on load).
LEGACY_RENAMES = ((re.compile(r"\.gamma$"), ".weight"), (re.compile(r"\.beta$"), ".bias"),
                  # torch.nn.utils.weight_norm's names (Wav2Vec2 / HuBERT positional convolution)
                  (re.compile(r"\.weight_g$"), ".parametrizations.weight.original0"),
                  (re.compile(r"\.weight_v$"), ".parametrizations.weight.original1"))


@dataclass(frozen=True)
class Family:
    """Everything jaxtune needs to know about one HF architecture family."""

    model_type: str  # the canonical HF model_type
    config_cls: type
    heads: dict  # task -> nnx.Module class; 'base' is the bare encoder/decoder
    base_prefix: str  # attribute holding the base model inside a head ('bert', 'transformer')
    depth_of: Callable[[Any, tuple], int]  # (config, path) -> 0 embeddings .. L+1 head
    num_layers: Callable[[Any], int]
    key_rules: tuple = ()  # family rules, tried before DEFAULT_RULES
    ignore_keys: tuple = ()  # checkpoint key regexes to skip silently (buffers, tied copies)
    new_ok: tuple = ()  # jaxtune path regexes that may start fresh (task heads, pooler)

    def head(self, task: str):
        if task not in self.heads:
            raise ModelLoadError(
                f"task '{task}' is not supported by {self.model_type} models; "
                f"supported: {', '.join(self.heads)}"
            )
        return self.heads[task]

    def task_of(self, architecture: str) -> Optional[str]:
        for task, cls in self.heads.items():
            if getattr(cls, "hf_architecture", None) == architecture:
                return task
        return None

    def to_hf_key(self, path: str) -> tuple[str, Callable, Callable]:
        for rule in self.key_rules + DEFAULT_RULES:
            if re.match(rule.pattern, path):
                return re.sub(rule.pattern, rule.hf, path).replace("/", "."), rule.to_hf, rule.from_hf
        raise AssertionError("DEFAULT_RULES ends with a catch-all")


def layered_depth(embed_keys: str | tuple[str, ...], layers_key: str, num_layers: Callable[[Any], int]):
    """A depth function: paths through an `embed_keys` module -> 0, `layers_key/i` -> i + 1, the
    rest (final norms, pooler, heads) -> L + 1."""
    embed_keys = (embed_keys,) if isinstance(embed_keys, str) else tuple(embed_keys)

    def depth_of(config, path: tuple) -> int:
        for i, part in enumerate(path):
            if part in embed_keys:
                return 0
            if part == layers_key and i + 1 < len(path) and isinstance(path[i + 1], int):
                return path[i + 1] + 1
        return num_layers(config) + 1

    return depth_of


def define(*, config_cls: type, heads: dict, base_prefix: str, params: ModuleType,
           layers: tuple = ("embeddings", "layer"), num_layers_field: str = "num_hidden_layers",
           model_type: Optional[str] = None) -> Family:
    """A family from its config class, heads and key-table module (`KEY_RULES`, `IGNORE_KEYS`, `NEW_OK`).

    `layers`: (embedding module name(s), layer-list attribute) for `layered_depth`;
    `num_layers_field`: the config field counting layers; `model_type`: the config class's.
    """
    num_layers = operator.attrgetter(num_layers_field)
    return Family(
        model_type=model_type or config_cls.model_type,
        config_cls=config_cls,
        heads=dict(heads),
        base_prefix=base_prefix,
        depth_of=layered_depth(*layers, num_layers),
        num_layers=num_layers,
        key_rules=params.KEY_RULES,
        ignore_keys=params.IGNORE_KEYS,
        new_ok=params.NEW_OK,
    )


def depth_tree(family: Family, config, params: dict) -> dict:
    """A dict shaped like the params holding each parameter's depth (0 .. num_layers + 1)."""
    return unflatten({p: family.depth_of(config, p) for p in flatten(params)})
