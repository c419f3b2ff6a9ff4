"""Resolve user paths, including `pkg:PACKAGE/relative/path` inside an installed package.

Bundled recipes point at assets shipped as Python packages (the MiniLM model, the tweet corpus)
without absolute paths. The package is located without importing it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from jaxtune.errors import JaxtuneError

PKG_PREFIX = "pkg:"


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise JaxtuneError(
            f"package '{name}' is not installed (bundled demo assets come with: pip install -e \".[demo]\")"
        )
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


def resolve_path(spec: str | os.PathLike) -> Path:
    """`pkg:NAME/rest` -> <site-packages>/NAME/rest; anything else -> an expanded local path."""
    s = os.fspath(spec)
    if s.startswith(PKG_PREFIX):
        rest = s[len(PKG_PREFIX):].lstrip("/")
        name, _, sub = rest.partition("/")
        if not name:
            raise JaxtuneError(f"'{s}': expected pkg:PACKAGE/path/inside/package")
        return package_dir(name) / sub
    return Path(os.path.expandvars(os.path.expanduser(s)))
