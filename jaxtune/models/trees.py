"""Parameter trees as plain data: paths, flat tables, and the functional view of a model.

A path is a tuple of plain keys, `('bert', 'encoder', 'layer', 3, 'attention', 'self', 'query',
'kernel')`, whatever pytree it came from: `key_path` is the one place a jax key path becomes one
(`flatten`, `jaxtune.parallel` and `jaxtune.transforms` all use it).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def key_path(keypath) -> tuple:
    """A jax key path (DictKey, SequenceKey, GetAttrKey, ...) -> a tuple of plain keys.

    >>> key_path(jax.tree_util.tree_flatten_with_path({"a": [0, {"b": 1}]})[0][1][0])
    ('a', 1, 'b')
    """
    out = []
    for k in keypath:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            out.append(str(k))
    return tuple(out)


def path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _not_a_dict(x) -> bool:
    return not isinstance(x, dict)


def flatten(tree: dict) -> dict[tuple, Any]:
    """Nested dicts -> {path tuple: leaf}; anything that is not a dict (None, a tuple) is a leaf.

    >>> flatten({"a": {"b": 1, "c": (None, "x")}})
    {('a', 'b'): 1, ('a', 'c'): (None, 'x')}
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_not_a_dict)
    return {key_path(kp): leaf for kp, leaf in leaves}


def unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


# ---------------------------------------------------------------------------------------------
# Functional view of a model: (graphdef, params dict, rest) <-> nnx.Module


def split(model: nnx.Module):
    """model -> (graphdef, params as a plain nested dict, other state)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params.to_pure_dict(), rest


def batch_stats(model: nnx.Module) -> dict:
    """The model's `nnx.BatchStat`s (BatchNorm running statistics) as a plain nested dict; `{}`
    for models without any. They load and export with the weights and train in `model_state`."""
    return nnx.state(model, nnx.BatchStat).to_pure_dict()


def merge(graphdef, params: dict, rest=None) -> nnx.Module:
    return nnx.merge(graphdef, params, rest) if rest is not None else nnx.merge(graphdef, params)


def logical_axes(model: nnx.Module) -> dict:
    """A dict shaped like the params whose leaves are tuples of logical axis names (None: unnamed)."""
    _, params, _ = nnx.split(model, nnx.Param, ...)
    flat = {}
    for path, var in nnx.to_flat_state(params):
        axes = var.get_metadata().get("logical_axes")
        flat[tuple(path)] = tuple(axes) if axes is not None else (None,) * len(var.shape)
    return unflatten(flat)


def abstract_model(cls, config, seed: int = 0) -> nnx.Module:
    """The model's structure with ShapeDtypeStructs instead of arrays: nothing is initialised."""
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(seed)))
