"""The model zoo: a registry keyed by HF `model_type`, loading and export, and the tree utilities
the rest of jaxtune uses on parameters.

`from_pretrained(path_or_id, task=...)` and `save_pretrained(model, out_dir)` work for every family
in `REGISTRY`; each family lives in its own folder (`modeling.py`, `params.py`).

Modules (one concern each): `config` (ConfigBase, EncoderConfig, DTYPES), `outputs` (ModelOutput),
`activations` (ACTIVATIONS by hidden_act), `dropout` (dropout and the PRNG keys that drive it),
`layers` (parameters with logical axes, self-attention, the layer stack), `heads` (what task heads
share), `kernels` (attention, dense, GELU: `cpu` and `xla` sets, chosen per backend), `family`
(the family record, key tables, `define`), `trees` (key paths, flat tables, split/merge),
`pretrained` (registry, loading, export), `hf` (checkpoint files), `gguf` (a .gguf file as an HF
folder: config, lazily dequantized tensors, tokenizer), `timm_folder` (a timm checkpoint folder's
config.json, read for the `timm_resnet` / `timm_vgg` families and written back), `generate`, `verify`.
"""

from jaxtune.models import kernels
from jaxtune.models.config import DTYPES, ConfigBase
from jaxtune.models.family import DEFAULT_RULES, Family, KeyRule, define, depth_tree, layered_depth
from jaxtune.models.kernels import plain_autodiff
from jaxtune.models.outputs import ModelOutput
from jaxtune.models.pretrained import (
    REGISTRY,
    export_tensors,
    family_of,
    from_config,
    from_pretrained,
    get_family,
    labels_differ,
    load_weights,
    make_config,
    place,
    save_pretrained,
    supported_model_types,
)
from jaxtune.models.trees import (
    abstract_model,
    flatten,
    key_path,
    logical_axes,
    merge,
    path_str,
    split,
    unflatten,
)

__all__ = [
    "DEFAULT_RULES",
    "DTYPES",
    "REGISTRY",
    "ConfigBase",
    "Family",
    "KeyRule",
    "ModelOutput",
    "abstract_model",
    "define",
    "depth_tree",
    "export_tensors",
    "family_of",
    "flatten",
    "from_config",
    "from_pretrained",
    "get_family",
    "labels_differ",
    "kernels",
    "key_path",
    "layered_depth",
    "load_weights",
    "logical_axes",
    "make_config",
    "merge",
    "path_str",
    "place",
    "plain_autodiff",
    "save_pretrained",
    "split",
    "supported_model_types",
    "unflatten",
]
