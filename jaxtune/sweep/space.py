"""SPACE files: the recipe keys a sweep searches and their ranges.

    optim.lr: {log_uniform: [1.0e-5, 1.0e-3]}      # a float, uniform in log space
    optim.layerwise_lr_decay: {uniform: [0.6, 1.0]}
    train.batch_size: {int: [8, 32]}               # an integer, both ends included
    train.epochs: {choice: [1, 2, 3]}              # one of these values
    optim.warmup: [0, 0.1]                         # a plain list: grid values (a choice otherwise)

`read_space(path, recipe, sampler)` checks everything before a trial runs and raises a one-line
`ConfigError` naming the SPACE file and the key: a key the recipe does not have, a range of the
wrong shape or with bad bounds, a value the key's type refuses (each bound and each choice is put
through the recipe's own validation), a continuous range under the grid sampler.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from jaxtune.config import Recipe, read_yaml, replace
from jaxtune.errors import ConfigError

KINDS = ("log_uniform", "uniform", "int", "choice")
# Keys the sweep itself sets in each trial's recipe: searching them would fight it.
OWNED = {"output_dir", "name", "train.metric", "train.metric_mode"}
GRID_MAX = 10_000  # an int range expanded into grid values: no more points than this


@dataclass(frozen=True)
class Dim:
    key: str  # a dotted recipe key, also the Optuna parameter name
    kind: str  # one of KINDS
    low: Any = None
    high: Any = None
    values: tuple = ()  # choice

    def grid_values(self) -> list:
        if self.kind == "choice":
            return list(self.values)
        return list(range(self.low, self.high + 1))  # int (read_space refuses the others)

    def to_json(self) -> dict:
        return {self.key: {self.kind: list(self.values) if self.kind == "choice" else [self.low, self.high]}}


def read_space(path, recipe: Recipe, sampler: str) -> list[Dim]:
    """The SPACE file at `path`, checked against `recipe` and `sampler` (grid, random, tpe)."""
    path = Path(path)
    try:
        raw = read_yaml(path)
    except ConfigError as e:
        raise ConfigError(str(e).replace("recipe", "SPACE file", 1)) from None
    if not raw:
        raise ConfigError(f"{path}: the SPACE file names no keys; map recipe keys to ranges, "
                          "e.g. 'optim.lr: {log_uniform: [1.0e-5, 1.0e-3]}'")
    dims = [_dim(path, str(key), spec) for key, spec in raw.items()]
    for d in dims:
        _check_key(path, d.key)
        if sampler == "grid" and d.kind in ("uniform", "log_uniform"):
            raise ConfigError(f"{path}: {d.key}: a {d.kind} range has no grid values; give a list "
                              "(or {choice: [...]}) for --sampler grid, or use --sampler random or tpe")
        if sampler == "grid" and d.kind == "int" and d.high - d.low >= GRID_MAX:
            raise ConfigError(f"{path}: {d.key}: int range [{d.low}, {d.high}] is too long a grid; give a list")
        for value in ([d.low, d.high] if d.kind != "choice" else d.values):
            try:
                replace(recipe, **{d.key: value})
            except ConfigError as e:
                why = str(e).split(": ", 1)[-1]  # less the "<recipe name>: " prefix
                raise ConfigError(f"{path}: {d.key}: {value!r} does not fit the recipe ({why})") from None
    return dims


def grid_size(dims: list[Dim]) -> int:
    return math.prod(len(d.grid_values()) for d in dims)


def suggest(trial, dims: list[Dim]) -> dict:
    """The trial's value of each key (sampled, or the fixed values of a retried trial)."""
    params = {}
    for d in dims:
        if d.kind == "choice":
            params[d.key] = trial.suggest_categorical(d.key, list(d.values))
        elif d.kind == "int":
            params[d.key] = trial.suggest_int(d.key, d.low, d.high)
        else:
            params[d.key] = trial.suggest_float(d.key, d.low, d.high, log=d.kind == "log_uniform")
    return params


def _dim(path: Path, key: str, spec) -> Dim:
    at = f"{path}: {key}"
    if isinstance(spec, list):
        spec = {"choice": spec}
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{at}: expected a list of values or one of {{{': [...]}, {'.join(KINDS)}: [...]}}, "
                          f"got {spec!r}")
    (kind, value), = spec.items()
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{at}: choice needs a non-empty list of values, got {value!r}")
        bad = [v for v in value if not (v is None or isinstance(v, (bool, int, float, str)))]
        if bad:
            raise ConfigError(f"{at}: choices must be single values (numbers, strings, true/false, null), "
                              f"got {bad[0]!r}")
        if len({repr(v) for v in value}) != len(value):
            raise ConfigError(f"{at}: a value is listed twice in {value!r}")
        return Dim(key, kind, values=tuple(value))
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError(f"{at}: {kind} needs [low, high], got {value!r}")
    low, high = (_number(at, kind, v) for v in value)
    if kind == "int" and not all(isinstance(v, int) for v in (low, high)):
        raise ConfigError(f"{at}: int needs whole-number bounds, got {value!r}")
    if not low < high:
        raise ConfigError(f"{at}: {kind} needs low < high, got {value!r}")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{at}: log_uniform needs low > 0, got {value!r}")
    if kind != "int":
        low, high = float(low), float(high)
    return Dim(key, kind, low, high)


def _number(at: str, kind: str, v):
    if isinstance(v, str):  # YAML reads 1e-5 (no dot) as a string, as recipes do
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{at}: {kind} bounds must be finite numbers, got {v!r}")
    return v


def _check_key(path: Path, key: str) -> None:
    """`key` names a recipe field (through nested sections; anything below a mapping field such
    as model.config); the sweep's own keys are refused."""
    if key in OWNED:
        raise ConfigError(f"{path}: {key}: the sweep sets this key itself (use --metric / --mode, --output)")
    tp, where = Recipe, []
    for part in key.split("."):
        tp = _unwrap(tp)
        if typing.get_origin(tp) is dict:
            return  # model.config.hidden_dropout_prob, optim.lr_multipliers.<regex>: any key
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{path}: {key}: '{'.'.join(where)}' is a value, not a section")
        names = [f.name for f in dataclasses.fields(tp)]
        if part not in names:
            near = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join(where + [near[0]])}'?" if near else ""
            raise ConfigError(f"{path}: {key}: the recipe has no key '{'.'.join(where + [part])}'{hint}")
        tp = typing.get_type_hints(tp)[part]
        where.append(part)
    if dataclasses.is_dataclass(_unwrap(tp)):
        raise ConfigError(f"{path}: {key}: is a section; name one of its keys")


def _unwrap(tp):
    """Optional[X] -> X."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def space_json(dims: list[Dim]) -> dict:
    """The space as data, to compare a rerun's SPACE with the sweep's."""
    out = {}
    for d in dims:
        out.update(d.to_json())
    return out


def dump_space(dims: list[Dim]) -> str:
    return yaml.safe_dump(space_json(dims), sort_keys=False)


__all__ = ["Dim", "KINDS", "dump_space", "grid_size", "read_space", "space_json", "suggest"]
