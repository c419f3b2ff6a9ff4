"""jaxtune: fine-tune pretrained Hugging Face models in JAX.

The public API is re-exported here; nothing is defined in this file. Heavy submodules are
imported lazily so that the CLI starts fast.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("jaxtune")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "from_pretrained": "jaxtune.models",
    "save_pretrained": "jaxtune.models",
    "from_config": "jaxtune.models",
    "load_recipe": "jaxtune.config",
    "JaxtuneError": "jaxtune.errors",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxtune' has no attribute '{name}'")


__all__ = ["__version__", *_LAZY]
