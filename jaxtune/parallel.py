"""Device meshes, logical-axis sharding rules and multi-host setup.

Sharding is data (DESIGN.md rule 8): parameters carry logical axis names (`embed`, `mlp`, `heads`,
`vocab`, ...) and a table of rules maps each name to mesh axes of a 3-axis mesh
`('data', 'fsdp', 'tensor')`. Nothing else in jaxtune mentions a mesh axis.

    plan = Plan.from_config(recipe.mesh)                       # mesh + rules
    model = jaxtune.from_pretrained(path, shardings=plan.param_shardings)
    state = plan.create_state(params, tx)                      # born on its shardings
    step = plan.jit_train_step(make_train_step(loss_fn, tx), state)
    state, metrics = step(state, plan.shard_batch(local_batch))

The same functions exist at module level (`make_mesh`, `param_shardings`, `create_state`, ...).
A rule may not split a dimension it does not divide: that dimension is replicated and a warning
says so once. The batch is sharded over `('data', 'fsdp')` (rule `batch`); with several processes
each one feeds only its own rows (`shard_batch`).

On CPU with several (fake) devices, wait for each step (read a metric) before dispatching the
next: with many multi-device steps queued, XLA's CPU runtime can deadlock in a collective
(seen with jax 0.10.2 on 2 cores; it aborts the process after 40 s). GPUs and TPUs are unaffected.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxtune.errors import JaxtuneError
from jaxtune.models import flatten, key_path, logical_axes, path_str, split, unflatten
from jaxtune.train import init_state, unwrap_optimizer

log = logging.getLogger("jaxtune")

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axes. FSDP splits the model dimension, tensor parallelism the wide
# ones (MLP, heads, vocab); small tables (positions, token types, labels) stay replicated.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv": ("tensor",),
    "vocab": ("tensor",),
    "position": (),
    "type": (),
    "classes": (),
    "length": (),
    "layers": (),
}

Rules = Mapping[str, Any]  # logical name -> None | mesh axis | list of mesh axes


# ---------------------------------------------------------------------------------------------
# Multi-host


def _on_tpu_vm() -> bool:
    """libtpu installed and TPU chips attached (v2-v4: /dev/accel*, v5e and later: /dev/vfio/N)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    **kwargs,
) -> bool:
    """Start `jax.distributed` when this is (or may be) one process of several; call it first.

    - Arguments or the environment variables `JAX_COORDINATOR_ADDRESS` (host:port of process 0),
      `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` given: those are used (`JAX_LOCAL_DEVICE_IDS` too,
      read by JAX itself). Works on any hardware, CPU included (collectives over gloo).
    - On a Cloud TPU VM (libtpu installed, TPU chips attached): `jax.distributed.initialize()`
      with no arguments; JAX finds the pod's workers from the TPU metadata.
    - Otherwise (one machine, one process): nothing to do.

    Set `JAXTUNE_DISTRIBUTED=0` to skip it. Returns whether more than one process runs. Must be
    called before any JAX computation; calling it again is harmless.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if os.environ.get("JAXTUNE_DISTRIBUTED", "") == "0":
        return False
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    try:
        if coordinator_address:
            n = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
            pid = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
            if n is None or pid is None:
                raise JaxtuneError(
                    f"coordinator {coordinator_address} is set but JAX_NUM_PROCESSES={n} and "
                    f"JAX_PROCESS_ID={pid}: set both to start a multi-process run"
                )
            jax.distributed.initialize(coordinator_address, int(n), int(pid), **kwargs)
        elif _on_tpu_vm():
            jax.distributed.initialize(**kwargs)
        else:
            return False
    except RuntimeError as e:
        raise JaxtuneError(f"jax.distributed.initialize failed: {str(e).splitlines()[0]}") from e
    log.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(),
             jax.local_device_count())
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Only process 0 writes logs, checkpoints metadata and exports."""
    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------
# Mesh


def mesh_sizes(data: int = -1, fsdp: int = 1, tensor: int = 1, *, num_devices: int) -> tuple:
    """Resolve the one -1 among (data, fsdp, tensor) against `num_devices`; check they fit."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    bad = [f"mesh.{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
    if bad:
        raise JaxtuneError(f"{', '.join(bad)}: mesh sizes must be positive or -1 (fill the rest)")
    if len(free) > 1:
        raise JaxtuneError(f"only one mesh axis may be -1, got {', '.join('mesh.' + k for k in free)}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    shown = " x ".join(f"{k}={v}" for k, v in sizes.items())
    if num_devices % fixed:
        raise JaxtuneError(
            f"mesh {shown} needs a multiple of {fixed} devices, but there are {num_devices}"
        )
    if free:
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise JaxtuneError(
            f"mesh {shown} uses {fixed} of the {num_devices} devices; "
            "set one axis to -1 to use them all"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(config=None, *, data=None, fsdp=None, tensor=None, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh from a MeshConfig and/or sizes (-1 fills the rest).

    `devices` (default: all devices of all processes) lets tests build a one-device mesh.
    """
    d, f, t = (config.data, config.fsdp, config.tensor) if config is not None else (-1, 1, 1)
    d = d if data is None else data
    f = f if fsdp is None else fsdp
    t = t if tensor is None else tensor
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_sizes(d, f, t, num_devices=len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# ---------------------------------------------------------------------------------------------
# Rules -> PartitionSpecs


def make_rules(overrides: Optional[Rules] = None, mesh: Optional[Mesh] = None) -> dict:
    """DEFAULT_RULES updated by `overrides` (e.g. a recipe's mesh.rules), values as tuples.

    Idempotent (resolved rules pass through). A rule naming a mesh axis that does not exist
    raises JaxtuneError.
    """
    rules = dict(DEFAULT_RULES)
    for name, value in (overrides or {}).items():
        if value is None:
            axes: tuple = ()
        elif isinstance(value, str):
            axes = (value,)
        else:
            axes = tuple(value)
        known = tuple(mesh.axis_names) if mesh is not None else MESH_AXES
        for a in axes:
            if a not in known:
                raise JaxtuneError(
                    f"mesh.rules.{name}: '{a}' is not a mesh axis; the mesh has {', '.join(known)}"
                )
        rules[name] = axes
    return rules


@dataclass
class _Fallbacks:
    """Dimensions a rule could not split, grouped and reported together in one warning."""

    items: dict = field(default_factory=dict)  # 'classes=3 over tensor=2' -> [param paths]

    def add(self, what: str, where: str):
        self.items.setdefault(what, []).append(where)

    def report(self):
        if not self.items:
            return
        parts = []
        for what, paths in self.items.items():
            shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
            parts.append(f"{what} in {len(paths)} param(s) ({shown})")
        msg = "; ".join(parts)
        if msg not in _REPORTED:  # once per distinct situation, however often shardings are asked
            _REPORTED.add(msg)
            log.warning("sharding: replicated where the mesh does not divide the dim: %s", msg)


_REPORTED: set = set()


def spec_for(names: tuple, shape: tuple, mesh: Mesh, rules: dict, where: str = "",
             fallbacks: Optional[_Fallbacks] = None) -> PartitionSpec:
    """PartitionSpec (one entry per dim) for an array whose dims carry logical `names`."""
    used: set = set()
    parts = []
    for name, dim in zip(names, shape):
        axes = tuple(a for a in rules.get(name, ()) if a not in used) if name else ()
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % ways:
            if fallbacks is not None:
                fallbacks.add(f"{name}={dim} over {'x'.join(axes)}={ways}", where)
            axes = ()
        used.update(axes)
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*parts)


def _names_of(leaf_names, ndim: int) -> tuple:
    if leaf_names is None:
        return (None,) * ndim
    return tuple(leaf_names)


def shardings_for(axes: dict, shapes: dict, mesh: Mesh, rules: Optional[dict] = None) -> dict:
    """NamedShardings for a params-shaped dict, given its logical `axes` tree and its arrays or
    ShapeDtypeStructs `shapes` (any pytree with a `.shape` per leaf)."""
    rules = make_rules(rules, mesh)
    flat_axes = flatten(axes)
    fallbacks = _Fallbacks()
    out = {}
    for path, leaf in flatten(shapes).items():
        if not jax.tree_util.all_leaves([leaf]):  # a structured param (QLoRA's QTensor): its arrays replicated
            out[path] = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), leaf)
            continue
        shape = tuple(leaf.shape)
        names = _names_of(flat_axes.get(path), len(shape))
        out[path] = NamedSharding(mesh, spec_for(names, shape, mesh, rules, path_str(path), fallbacks))
    fallbacks.report()
    return unflatten(out)


def param_shardings(model, mesh: Mesh, rules: Optional[Rules] = None) -> dict:
    """NamedShardings shaped like `split(model)[1]`, from each param's `logical_axes` metadata.

    `model` may be abstract (`nnx.eval_shape`), so this works as
    `from_pretrained(..., shardings=functools.partial(param_shardings, mesh=mesh))`.
    Parameters without logical axes are replicated.
    """
    rules = make_rules(rules, mesh)
    _, params, _ = split(model)
    return shardings_for(logical_axes(model), params, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------------------------------------
# Optimizer state and TrainState shardings


def like_params(tree, params, param_sh, mesh: Mesh):
    """Shardings for any pytree whose leaves mirror params (optax states, EMA, anchors).

    A leaf takes the sharding of the parameter whose full path ends its own path and whose shape
    matches (Adam's mu/nu, L2-SP's anchor); anything else (step counts, factored moments) is
    replicated.
    """
    by_path = {}
    sh_leaves = jax.tree.leaves(param_sh, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    p_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (kp, leaf), sh in zip(p_leaves, sh_leaves):
        by_path[key_path(kp)] = (tuple(leaf.shape), sh)
    repl = replicated(mesh)

    def pick(kp, leaf):
        path, shape = key_path(kp), tuple(getattr(leaf, "shape", ()))
        for i in range(len(path)):
            hit = by_path.get(path[i:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return repl

    return jax.tree_util.tree_map_with_path(pick, tree)


def opt_state_shardings(tx, params, param_sh, mesh: Mesh):
    """Shardings of `tx.init(params)`, derived from the params' shardings (nothing is computed)."""
    return like_params(jax.eval_shape(tx.init, params), params, param_sh, mesh)


def current_shardings(params, mesh: Mesh):
    """The NamedShardings `params` already have on `mesh`; replicated where they have none."""
    repl = replicated(mesh)

    def pick(x):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh.shape_tuple == mesh.shape_tuple:
            return NamedSharding(mesh, sh.spec)
        return repl

    return jax.tree.map(pick, params)


def state_shardings(abstract_state, params, param_sh, mesh: Mesh, model_state_sh=None):
    """Shardings of a TrainState: params as given, optimizer state mirroring them, model_state as
    given (a LoRA run's frozen base: sharded like the params it is) or replicated, rest replicated."""
    repl = replicated(mesh)
    if model_state_sh is None:
        model_state_sh = jax.tree.map(lambda _: repl, abstract_state.model_state)
    return abstract_state.replace(
        step=repl,
        params=param_sh,
        opt_state=like_params(abstract_state.opt_state, params, param_sh, mesh),
        rng=repl,
        model_state=model_state_sh,
    )


def abstract_state(params, tx, mesh: Mesh, param_shardings, *, rng=0, model_state=None,
                   model_state_shardings=None):
    """The TrainState `init_state(params, rng, model_state, tx=tx)` would make, as
    ShapeDtypeStructs carrying their shardings: nothing is allocated or computed.

    `params` may be arrays or ShapeDtypeStructs; `tx` an optax GradientTransformation or a
    jaxtune Optimizer (its `.tx`). This is what `create_state` places arrays on and what a
    checkpoint is restored into.
    """
    tx = unwrap_optimizer(tx)[0]
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    init = functools.partial(init_state, tx=tx)
    shapes = jax.eval_shape(init, params, rng, {} if model_state is None else model_state)
    shardings = state_shardings(shapes, params, param_shardings, mesh, model_state_shardings)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def create_state(params, tx, mesh: Mesh, *, param_shardings=None, rng=0, model_state=None):
    """A TrainState created directly on its shardings: one jit whose out_shardings place every
    array, so the whole optimizer state never sits on one device.

    `params`: arrays (ideally already sharded, e.g. from `from_pretrained(shardings=...)`) or
    host arrays; `param_shardings` defaults to the shardings the params already have.
    `tx`: an optax GradientTransformation or a jaxtune Optimizer (its `.tx`).
    """
    if param_shardings is None:
        param_shardings = current_shardings(params, mesh)
    else:  # host arrays go straight to their shards; placed arrays stay put
        params = jax.device_put(params, param_shardings)
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    model_state = {} if model_state is None else model_state
    target = abstract_state(params, tx, mesh, param_shardings, rng=rng, model_state=model_state)
    init = functools.partial(init_state, tx=unwrap_optimizer(tx)[0])
    return jax.jit(init, out_shardings=shardings_of(target))(params, rng, model_state)


# ---------------------------------------------------------------------------------------------
# Batches


def batch_axes(rules: dict) -> tuple:
    return tuple(rules.get("batch", ()))


def batch_sharding(mesh: Mesh, rules: Optional[dict] = None) -> NamedSharding:
    """Leading (batch) dim over the `batch` rule's axes, other dims replicated."""
    rules = make_rules(rules, mesh)
    axes = batch_axes(rules)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def _batch_layout(mesh: Mesh, rules: dict) -> tuple[int, int, str]:
    """(batch shards in all, batch shards this process holds, 'data=2 x fsdp=4')."""
    axes = batch_axes(rules)
    shown = " x ".join(f"{a}={mesh.shape[a]}" for a in axes) or "none"
    order = [mesh.axis_names.index(a) for a in axes]
    rest = [i for i in range(mesh.devices.ndim) if i not in order]
    rows = np.transpose(mesh.devices, order + rest).reshape(math.prod(mesh.shape[a] for a in axes), -1)
    me = jax.process_index()
    local = sum(any(d.process_index == me for d in row) for row in rows)
    return len(rows), local, shown


def local_batch_size(global_batch_size: int, mesh: Mesh, rules: Optional[dict] = None) -> int:
    """The rows this process feeds per step; raises when the batch does not split evenly."""
    rules = make_rules(rules, mesh)
    total, local, shown = _batch_layout(mesh, rules)
    if global_batch_size % total:
        raise JaxtuneError(
            f"batch size {global_batch_size} is not divisible by the {total} batch shards "
            f"(mesh {shown})"
        )
    return global_batch_size // total * local


def shard_batch(local_batch, mesh: Mesh, rules: Optional[dict] = None):
    """Host arrays of this process's rows -> global jax.Arrays sharded over the batch axes.

    With one process `local_batch` is the whole batch; with several, each passes only its share
    (`local_batch_size` rows) and JAX assembles the global batch without moving data between hosts.
    """
    rules = make_rules(rules, mesh)
    total, local, shown = _batch_layout(mesh, rules)
    sharding = batch_sharding(mesh, rules)

    def one(x):
        x = np.asarray(x)
        rows = x.shape[0]
        if rows % local:
            what = "batch size" if local == total else "this process's batch of"
            raise JaxtuneError(
                f"{what} {rows} is not divisible by the {local} batch shards "
                f"(mesh {shown}{'' if local == total else f', {total} over all processes'})"
            )
        global_shape = (rows // local * total,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, local_batch)


# ---------------------------------------------------------------------------------------------
# Jitted steps


def jit_train_step(train_step: Callable, state_sh, mesh: Mesh, rules: Optional[dict] = None,
                   *, donate: bool = True):
    """`jax.jit(train_step)` with the state's and batch's shardings; the old state is donated."""
    return jax.jit(
        train_step,
        in_shardings=(state_sh, batch_sharding(mesh, rules)),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )


def jit_eval_step(eval_step: Callable, state_sh, mesh: Mesh, rules: Optional[dict] = None):
    """`jax.jit(eval_step)`; its outputs (sums over the batch) come back replicated."""
    return jax.jit(
        eval_step,
        in_shardings=(state_sh, batch_sharding(mesh, rules)),
        out_shardings=replicated(mesh),
    )


def shardings_of(tree):
    """The `.sharding` of every array of a pytree (e.g. a created TrainState)."""
    return jax.tree.map(lambda x: x.sharding, tree)


# ---------------------------------------------------------------------------------------------
# A mesh and its rules together


@dataclass(frozen=True)
class Plan:
    """A mesh with its resolved rules; methods are the module functions bound to them."""

    mesh: Mesh
    rules: dict

    @classmethod
    def from_config(cls, config=None, *, devices=None, **sizes) -> "Plan":
        """From a MeshConfig (`data`, `fsdp`, `tensor`, `rules`) and/or sizes."""
        mesh = make_mesh(config, devices=devices, **sizes)
        return cls(mesh, make_rules(getattr(config, "rules", None), mesh))

    def param_shardings(self, model) -> dict:
        return param_shardings(model, self.mesh, self.rules)

    def create_state(self, params, tx, **kwargs):
        return create_state(params, tx, self.mesh, **kwargs)

    def abstract_state(self, params, tx, param_shardings, **kwargs):
        return abstract_state(params, tx, self.mesh, param_shardings, **kwargs)

    def batch_sharding(self) -> NamedSharding:
        return batch_sharding(self.mesh, self.rules)

    def local_batch_size(self, global_batch_size: int) -> int:
        return local_batch_size(global_batch_size, self.mesh, self.rules)

    def shard_batch(self, local_batch):
        return shard_batch(local_batch, self.mesh, self.rules)

    def jit_train_step(self, train_step, state, *, donate: bool = True):
        """`state`: a created TrainState (its arrays' shardings are used) or a tree of shardings."""
        return jit_train_step(train_step, _as_shardings(state), self.mesh, self.rules, donate=donate)

    def jit_eval_step(self, eval_step, state):
        return jit_eval_step(eval_step, _as_shardings(state), self.mesh, self.rules)


def _as_shardings(state):
    return jax.tree.map(lambda x: x if isinstance(x, jax.sharding.Sharding) else x.sharding, state,
                        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
