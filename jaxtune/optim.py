"""One Optax chain for fine-tuning, built from a recipe's `optim` section.

`make_optimizer(cfg, params, pretrained=..., depth_of=..., total_steps=...)` returns an `Optimizer`
whose `tx` is ONE `optax.GradientTransformation`, in this order:

    EWC penalty gradient (optim.ewc: strength * Fisher * (theta - theta0), jaxtune.ewc), masked
    -> clip (global norm)
    -> base optimizer without learning rate (scale_by_adam | adafactor | sgd momentum | lion)
    -> decoupled weight decay, masked (no biases, no norm parameters, embeddings only with
       decay_embeddings): toward zero, or toward the pretrained weights (L2-SP, theta0 in state)
    -> per-parameter LR multipliers: layer-wise decay d^(L+1-depth) x matching lr_multipliers
    -> gradual unfreezing gates (0/1, from a counter in the state: no recompilation)
    -> schedule: scale by -lr(update)
    all wrapped in optax.MultiSteps when accumulate > 1, and then
    -> freezing: optax.partition({'train': <the above>, 'frozen': set_to_zero}), so frozen
       parameters get exact zero updates and hold no optimizer state (no moments, no theta0,
       no accumulator).

Per-parameter settings are computed once, in Python, from '/'-joined parameter paths
(`bert/encoder/layer/3/attention/self/query/kernel`), and are matched to the updates by path.
A depth may be an int array (one depth per slice along axis 0) for layers stacked for `scan`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.config import OptimConfig, check_optim
from jaxtune.ewc import ewc
from jaxtune.errors import ConfigError
from jaxtune.models.trees import flatten, path_str, unflatten
from jaxtune.transforms import decay_toward_pretrained, gradual_unfreeze, lookup, scale_by_factors

NO_DECAY_LEAVES = ("bias", "scale")  # Linear/LayerNorm biases, LayerNorm scales


@dataclass(frozen=True)
class ParamPlan:
    """What the chain does to one parameter (for logs and tests)."""

    frozen: bool
    decay: Optional[str]  # None, 'zero' or 'pretrained'
    multiplier: Any  # float, or an array with one factor per slice along axis 0
    start_step: Any  # update at which it starts moving (int or per-slice array); 0 = always


@dataclass(frozen=True)
class Optimizer:
    tx: optax.GradientTransformation
    learning_rate: Callable[[Any], jnp.ndarray]  # TRAIN step (micro-step) -> scheduled base lr
    schedule: Callable[[Any], jnp.ndarray]  # optimizer update count -> base lr
    accumulate: int
    total_steps: int  # optimizer updates
    warmup_steps: int
    plan: dict[str, ParamPlan] = field(default_factory=dict)  # path -> what happens to it


# ---------------------------------------------------------------------------------------------
# Schedules


def warmup_steps_of(cfg: OptimConfig, total_steps: int) -> int:
    """optim.warmup as steps: >= 1 is a step count, < 1 a fraction of `total_steps`."""
    w = int(cfg.warmup) if cfg.warmup >= 1 else int(round(cfg.warmup * total_steps))
    if w > total_steps:
        raise ConfigError(
            f"optim.warmup ({w} steps) is longer than training ({total_steps} optimizer steps)"
        )
    return w


def make_schedule(cfg: OptimConfig, total_steps: int) -> Callable[[Any], jnp.ndarray]:
    """update count -> lr: linear warmup from 0, then constant / linear / cosine to end_lr * lr.

    As in transformers' schedules, the lr at update 0 is 0 when there is warmup.
    """
    lr, end, kind = cfg.lr, cfg.end_lr, cfg.schedule
    warmup = warmup_steps_of(cfg, total_steps)
    span = max(total_steps - warmup, 1)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        t = jnp.clip((step - warmup) / span, 0.0, 1.0)
        if kind == "constant":
            decay = jnp.ones_like(t)
        elif kind == "linear":
            decay = 1.0 - (1.0 - end) * t
        else:  # cosine
            decay = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        warm = step / max(warmup, 1)
        return lr * jnp.where(step < warmup, warm, decay)

    return schedule


# ---------------------------------------------------------------------------------------------
# Base optimizers (no learning rate: the schedule comes last)


def base_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    if cfg.name == "adamw":
        return optax.scale_by_adam(
            b1=cfg.b1, b2=0.999 if cfg.b2 is None else cfg.b2, eps=1e-8 if cfg.eps is None else cfg.eps
        )
    if cfg.name == "lion":
        return optax.scale_by_lion(b1=cfg.b1, b2=0.99 if cfg.b2 is None else cfg.b2)
    if cfg.name == "sgd":
        if cfg.momentum == 0:
            return optax.identity()
        return optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adafactor":
        # optax.adafactor's defaults, minus the parameter-scale multiplier: lr is absolute here,
        # as with the other optimizers (transformers' fine-tuning advice: scale_parameter=False).
        return optax.chain(
            optax.scale_by_factored_rms(epsilon=1e-30 if cfg.eps is None else cfg.eps),
            optax.clip_by_block_rms(1.0),
        )
    raise ConfigError(f"optim.name: {cfg.name!r} is not one of adamw, adafactor, sgd, lion")


# ---------------------------------------------------------------------------------------------
# Per-parameter rules


def _compile(key: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"optim.{key}: invalid regex {pattern!r}: {e}") from None


def _matching(key: str, pattern: str, paths: list[str]) -> set[str]:
    rx = _compile(key, pattern)
    hits = {p for p in paths if rx.search(p)}
    if not hits:
        raise ConfigError(
            f"optim.{key}: pattern {pattern!r} matches no parameter "
            f"(paths look like '{paths[-1]}')"
        )
    return hits


def is_decayed(path: tuple, decay_embeddings: bool) -> bool:
    """Weight decay applies to kernels; never to biases or norm parameters; embeddings optionally."""
    leaf = str(path[-1])
    if leaf in NO_DECAY_LEAVES or any("norm" in str(part).lower() for part in path[:-1]):
        return False
    if leaf == "embedding" or "embed" in leaf.lower():
        return decay_embeddings
    return True


def _depth(depth_of: Callable, path: tuple):
    d = np.asarray(depth_of(path))
    if d.ndim > 1 or not np.issubdtype(d.dtype, np.integer):
        raise ValueError(f"depth_of({path_str(path)}) must be an int or a 1-D int array, got {d!r}")
    return d


def _scalar_or_array(x: np.ndarray):
    return float(x) if x.ndim == 0 else x


def make_optimizer(
    cfg: OptimConfig,
    params: dict,
    *,
    pretrained: Optional[dict] = None,
    depth_of: Optional[Callable[[tuple], Any]] = None,
    num_layers: Optional[int] = None,
    total_steps: int,
) -> Optimizer:
    """Build the fine-tuning chain for `params` (a plain nested dict of arrays).

    pretrained: dict shaped like params; a None leaf (or a missing path) marks a parameter the
      checkpoint did not have, which decays toward zero under decay_toward=pretrained. theta0 is
      the params given to `tx.init` (initialise right after loading). None: every parameter is
      anchored at its initial value.
    depth_of: path tuple -> 0 (embeddings) .. L (layers) .. L+1 (head); or a 1-D int array for a
      leaf whose layers are stacked on axis 0. Needed for layerwise_lr_decay and unfreeze.
    num_layers: L; None: the largest depth minus one.
    total_steps: optimizer updates in the run (warmup fractions and decay horizons).
    """
    check_optim(cfg)
    if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) or (
        total_steps < 1
    ):
        raise ConfigError(f"total_steps must be a positive number of updates, got {total_steps!r}")
    flat = flatten(params)
    if not flat:
        raise ConfigError("make_optimizer: params is empty")
    paths = {p: path_str(p) for p in flat}
    names = list(paths.values())

    # Freezing and per-group multipliers: every pattern must match something.
    frozen_names: set[str] = set()
    for pattern in cfg.freeze:
        frozen_names |= _matching("freeze", pattern, names)
    group_mult = {n: 1.0 for n in names}
    for pattern, factor in cfg.lr_multipliers.items():
        for n in _matching("lr_multipliers", pattern, names):
            group_mult[n] *= factor  # several matching patterns multiply

    # Depths (for layer-wise decay and gradual unfreezing).
    needs_depth = cfg.layerwise_lr_decay is not None or cfg.unfreeze is not None
    depths = {}
    if needs_depth:
        if depth_of is None:
            key = "layerwise_lr_decay" if cfg.layerwise_lr_decay is not None else "unfreeze"
            raise ConfigError(f"optim.{key} needs the model family's depth function (depth_of)")
        depths = {p: _depth(depth_of, p) for p in flat}
        if num_layers is None:
            num_layers = int(max(d.max() for d in depths.values())) - 1
    L = num_layers

    pre_flat = flatten(pretrained) if pretrained is not None else None
    wd = cfg.weight_decay
    plan: dict[str, ParamPlan] = {}
    mult, start, labels, decay_zero, decay_pre = {}, {}, {}, {}, {}
    for p, name in paths.items():
        m = np.asarray(group_mult[name], np.float64)
        if cfg.layerwise_lr_decay is not None:
            m = m * cfg.layerwise_lr_decay ** (L + 1 - np.minimum(depths[p], L + 1)).astype(np.float64)
        s = np.asarray(0)
        if cfg.unfreeze is not None:
            d = depths[p]
            group = np.maximum(L - d, 0) // cfg.unfreeze.group_size  # 0 = top layers
            s = np.where(d >= L + 1, 0, group * cfg.unfreeze.every)  # the head always trains
        frozen = name in frozen_names
        decay = None
        if wd > 0 and not frozen and is_decayed(p, cfg.decay_embeddings):
            fresh = pre_flat is not None and pre_flat.get(p) is None
            decay = "pretrained" if cfg.decay_toward == "pretrained" and not fresh else "zero"
        mult[p], start[p] = _scalar_or_array(m), s if s.ndim else int(s)
        labels[p] = "frozen" if frozen else "train"
        decay_zero[p], decay_pre[p] = decay == "zero", decay == "pretrained"
        plan[name] = ParamPlan(frozen, decay, mult[p], start[p])

    trainable = [p for p in flat if labels[p] == "train"]
    if not trainable:
        raise ConfigError("optim.freeze: every parameter is frozen; nothing would train")

    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.ewc is not None:  # EWC's penalty is part of the loss gradient: first, before clipping
        fresh_paths = {p for p in flat if pre_flat is not None and pre_flat.get(p) is None}
        held = {p: labels[p] == "train" and p not in fresh_paths for p in flat}
        parts.append(ewc(cfg.ewc.strength, mask=lookup(unflatten(held))))
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(base_optimizer(cfg))
    if any(decay_zero.values()):
        parts.append(optax.add_decayed_weights(wd, mask=lookup(unflatten(decay_zero))))
    if any(decay_pre.values()):
        parts.append(decay_toward_pretrained(wd, mask=lookup(unflatten(decay_pre))))
    if any(np.any(np.asarray(mult[p]) != 1.0) for p in trainable):
        parts.append(scale_by_factors(unflatten(mult)))
    if cfg.unfreeze is not None:
        parts.append(gradual_unfreeze(unflatten(start)))
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)
    k = cfg.accumulate
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    if frozen_names:
        tx = optax.partition({"train": tx, "frozen": optax.set_to_zero()}, lookup(unflatten(labels)))

    def learning_rate(step):
        """The scheduled base lr at train (micro-)step `step`: update count = step // accumulate."""
        return schedule(jnp.asarray(step) // k)

    return Optimizer(
        tx=tx,
        learning_rate=learning_rate,
        schedule=schedule,
        accumulate=k,
        total_steps=int(total_steps),
        warmup_steps=warmup_steps_of(cfg, total_steps),
        plan=plan,
    )


def pretrained_tree(params: dict, fresh: list[tuple]) -> dict:
    """`pretrained=` for make_optimizer from `from_pretrained(..., output_loading_info=True)`'s
    `info['fresh']`: the params, with None at the freshly initialised paths."""
    fresh = {tuple(p) for p in fresh}
    return unflatten({p: (None if p in fresh else v) for p, v in flatten(params).items()})
