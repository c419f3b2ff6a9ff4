"""The model zoo: a registry keyed by HF `model_type`, loading and export.

`from_pretrained(path_or_id, task=...)` and `save_pretrained(model, out_dir)` work for every family
in `REGISTRY`; each family lives in its own folder (`modeling.py`, `params.py`).
"""

from jaxtune.models.core import ModelOutput, logical_axes, merge, plain_autodiff, split
from jaxtune.models.pretrained import (
    REGISTRY,
    export_tensors,
    family_of,
    from_config,
    from_pretrained,
    get_family,
    save_pretrained,
    supported_model_types,
)

__all__ = [
    "REGISTRY",
    "ModelOutput",
    "export_tensors",
    "family_of",
    "from_config",
    "from_pretrained",
    "get_family",
    "logical_axes",
    "merge",
    "plain_autodiff",
    "save_pretrained",
    "split",
    "supported_model_types",
]
