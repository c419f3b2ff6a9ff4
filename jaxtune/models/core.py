"""What every model family shares: config plumbing, outputs, layers, the family record.

Conventions every family follows (the optimizer, sharding and I/O rely on them):

- Parameters are `nnx.Param`s whose metadata `logical_axes` names each dimension
  (`vocab`, `embed`, `mlp`, `heads`, `kv`, `position`, `type`, `classes`, ...), or None.
  `jaxtune.parallel` maps these names to mesh axes; no model code mentions a mesh.
- Leaf names: `nnx.Linear` -> `kernel` (in, out) / `bias`; `nnx.LayerNorm` -> `scale` / `bias`;
  `nnx.Embed` -> `embedding`. Weight-decay masks key on these names.
- Module attributes are named like the Hugging Face modules, so a jaxtune path such as
  `bert/encoder/layer/3/attention/self/query/kernel` maps mechanically to the HF key
  `bert.encoder.layer.3.attention.self.query.weight` (see `KeyRule`).
- A model is called like its HF twin: `model(input_ids=..., attention_mask=...)` returns a
  `ModelOutput` with `.logits` (heads) or `.last_hidden_state` (base models). Training mode is
  `deterministic=False` with `rngs=` a PRNG key for dropout.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.random import threefry2x32_p

# ---------------------------------------------------------------------------------------------
# Configs

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

    num_labels: int = 2
    id2label: Optional[tuple[str, ...]] = None
    problem_type: Optional[str] = None
    dtype: str = "float32"  # parameter dtype
    compute_dtype: Optional[str] = None  # None: same as dtype
    remat: bool = False
    extra: tuple[tuple[str, str], ...] = ()

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


# ---------------------------------------------------------------------------------------------
# Outputs


@flax.struct.dataclass
class ModelOutput:
    """What every model returns; unused fields stay None (a pytree, so jit can return it)."""

    logits: Optional[jax.Array] = None
    last_hidden_state: Optional[jax.Array] = None
    pooler_output: Optional[jax.Array] = None
    hidden_states: Optional[tuple[jax.Array, ...]] = None
    past_key_values: Any = None


# ---------------------------------------------------------------------------------------------
# Layers


def _gelu_exact(x):
    """PyTorch's `x/2 * (1 + erf(x/sqrt 2))`; equal to jax.nn.gelu(approximate=False) to 1e-6.

    Why not jax.nn.gelu: it goes through erfc, which XLA CPU expands into two polynomials and an
    exp (8.1 ms vs 1.7 ms on a (32, 128, 1536) block). The final `where` (both branches equal on
    erf's [-1, 1]) keeps the whole GELU out of the next matmul's YNNPACK fusion: without it XLA
    put the `x/2 * (1 + erf)` tail there and materialised two (32, 128, 1536) constant broadcasts
    for it, ~60 ms of a 650 ms MiniLM eval step on 2 cores.
    """
    erf = jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype))
    half_x = x * 0.5
    return jnp.where(jnp.abs(erf) <= 1, half_x * (1.0 + erf), half_x * (1.0 + jnp.sign(erf)))


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "linear": lambda x: x,
}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        from jaxtune.errors import ModelLoadError

        raise ModelLoadError(
            f"hidden_act '{name}' is not supported; supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]


def normal(std: float):
    return nnx.initializers.normal(stddev=std)


# Whether `linear` layers trace with the hand-written backward below; `plain_autodiff()` turns
# it off where forward-mode differentiation (jax.jvp, jax.hessian) of a model is needed.
_DENSE_BACKWARD = contextvars.ContextVar("jaxtune_dense_backward", default=True)


@contextlib.contextmanager
def plain_autodiff():
    """Trace models inside this block with XLA's own dense-layer derivatives.

    jaxtune's dense layers have a custom reverse-mode rule (see `dense_dot_general`); JAX cannot
    apply forward mode (`jax.jvp`, `jax.linearize`, `jax.hessian`) to such a rule. Call or jit the
    model inside `with jaxtune.models.plain_autodiff():` for those; the values are the same.
    """
    token = _DENSE_BACKWARD.set(False)
    try:
        yield
    finally:
        _DENSE_BACKWARD.reset(token)


@jax.custom_vjp
def _dense(x, kernel):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x, kernel):
    return _dense(x, kernel), (x, kernel)


def _dense_bwd(residuals, g):
    x, kernel = residuals
    # Without the barrier XLA CPU fuses the producer of `g` (layer-norm backward, dropout mask...)
    # into the transposed copy that feeds the kernel-gradient matmul, and that fusion walks all
    # its inputs with a stride of the feature size: ~25 ms for a (4096, 384) MiniLM activation.
    x, g = jax.lax.optimization_barrier((x, g))
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    # As a 2-D (rows, in) x (rows, out) contraction: over several leading dims XLA transposes
    # both operands with slower copies.
    rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dkernel = jax.lax.dot_general(rows_x, rows_g, (((0,), (0,)), ((), ())))
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      out_sharding=None):
    """`nnx.Linear`'s dot_general: `x @ kernel` with the hand-written backward above (MiniLM
    train step ~12% faster on 2 CPU cores); anything else goes to `lax.dot_general`."""
    plain = (dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
             and precision is None and preferred_element_type is None and out_sharding is None)
    if plain and _DENSE_BACKWARD.get():
        return _dense(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding)


def linear(
    cfg: ConfigBase, din: int, dout: int, axes: tuple, *, rngs: nnx.Rngs, std: float = 0.02,
    use_bias: bool = True,
) -> nnx.Linear:
    """An nnx.Linear whose kernel (din, dout) and bias (dout,) carry logical axis names."""
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dot_general=dense_dot_general,
        dtype=cfg.activation_dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=normal(std),
        bias_init=nnx.initializers.zeros_init(),
        kernel_metadata={"logical_axes": tuple(axes)},
        bias_metadata={"logical_axes": (axes[1],)},
        rngs=rngs,
    )


def embed(cfg: ConfigBase, num: int, dim: int, axes: tuple, *, rngs: nnx.Rngs, std: float = 0.02,
          init: Optional[Callable] = None):
    """An nnx.Embed (num, dim) with logical axis names; `init` replaces the normal(std) initialiser."""
    return nnx.Embed(
        num,
        dim,
        dtype=cfg.activation_dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=init or normal(std),
        embedding_metadata={"logical_axes": tuple(axes)},
        rngs=rngs,
    )


def layer_norm(cfg: ConfigBase, dim: int, eps: float, *, rngs: nnx.Rngs, axis: str = "embed"):
    # Exact variance (not E[x^2] - E[x]^2) so fp32 matches PyTorch to 1e-5.
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=cfg.activation_dtype,
        param_dtype=cfg.param_dtype,
        use_fast_variance=False,
        scale_metadata={"logical_axes": (axis,)},
        bias_metadata={"logical_axes": (axis,)},
        rngs=rngs,
    )


def attention_bias(mask_BS: Optional[jax.Array], dtype) -> Optional[jax.Array]:
    """(batch, keys) 1/0 mask -> additive (batch, 1, 1, keys) bias: 0 where kept, -big where masked."""
    if mask_BS is None:
        return None
    return jnp.where(mask_BS[:, None, None, :].astype(bool), 0.0, jnp.finfo(dtype).min).astype(dtype)


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BSNH: jax.Array,
    v_BSNH: jax.Array,
    bias: Optional[jax.Array] = None,
    *,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    rng: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    query_rows: Optional[int] = None,
) -> jax.Array:
    """Softmax attention, (batch, queries, heads, head_dim) layout; bias broadcasts to BNTS.

    Softmax runs in float32 whatever the compute dtype. One function for every family, so a
    faster formulation lands everywhere at once. `scale` defaults to 1 / sqrt(head_dim).
    `query_rows`: the queries are the first rows of a self-attention over that many (a layer
    that computes only the first token); dropout then draws the mask those rows would get.

    Why heads-major and the barriers: on XLA CPU, the einsums in BTNH layout fuse with the softmax
    into one slow kernel. Moving to (batch, heads, T, H) first and keeping the two matmuls and the
    softmax apart made the MiniLM forward 1.33x faster (eval 40.5 -> 53.7 ex/s, batch 32, seq 128,
    2 cores) and the train step 1.08x; see tools/bench.py.

    Why the softmax is normalised after the second matmul: `(exp @ v) / sum` equals
    `(exp / sum) @ v` but divides a (B, N, T, H) tensor instead of the (B, N, T, S) one, and on XLA
    CPU the matmul can then read the exponentials as they are made: the attention took 8.9 ms
    instead of 14.6 per MiniLM layer (batch 32, seq 128) and the eval step ~7% less time. Dropout
    on the unnormalised weights is the same dropout (the mask and scale commute with the division).
    """
    dtype = q_BTNH.dtype
    scale = 1.0 / math.sqrt(q_BTNH.shape[-1]) if scale is None else scale
    barrier = jax.lax.optimization_barrier
    q_BNTH, k_BNSH, v_BNSH = barrier(tuple(
        a.transpose(0, 2, 1, 3) for a in (q_BTNH * jnp.asarray(scale, dtype), k_BSNH, v_BSNH)))
    scores_BNTS = barrier(jnp.einsum("bnth,bnsh->bnts", q_BNTH, k_BNSH)).astype(jnp.float32)
    if bias is not None:
        scores_BNTS = scores_BNTS + bias.astype(jnp.float32)
    # softmax's own max shift (constant per row, so no gradient flows through it)
    exp_BNTS = jnp.exp(scores_BNTS - jax.lax.stop_gradient(scores_BNTS.max(axis=-1, keepdims=True)))
    sum_BNT1 = exp_BNTS.sum(axis=-1, keepdims=True)
    exp_BNTS = exp_BNTS.astype(dtype)
    if not deterministic and dropout_rate > 0.0:
        B, N, T, S = exp_BNTS.shape
        exp_BNTS = dropout(exp_BNTS, dropout_rate, rng, within=(B, N, query_rows or T, S))
    # float32 out of the matmul: before the division it sums up to S rows of v (float16 overflows)
    out_BNTH = barrier(jnp.einsum("bnts,bnsh->bnth", barrier(exp_BNTS), v_BNSH,
                                  preferred_element_type=jnp.float32)) / sum_BNT1
    return out_BNTH.astype(dtype).transpose(0, 2, 1, 3)


def _uniform_u16(rng: jax.Array, shape: tuple, within: Optional[tuple] = None) -> jax.Array:
    """Uniform integers in [0, 65536) (as uint32), four per threefry2x32 evaluation.

    `jax.random.bernoulli` spends a whole threefry2x32 evaluation (two 32-bit words) per element,
    which made dropout's random numbers about a fifth of a BERT train step on CPU. Here each
    evaluation's two words give four 16-bit numbers. Non-threefry keys take `jax.random.bits`.
    `within`: return the leading `shape` corner of the numbers drawn for this larger shape
    (same last dimension); threefry keys compute only that corner, other keys draw it all.
    """
    within = tuple(shape) if within is None else tuple(within)
    if len(within) != len(shape) or (shape and within[-1] != shape[-1]) or any(
            s > w for s, w in zip(shape, within)):
        raise ValueError(f"dropout shape {tuple(shape)} is not a leading corner of {within} "
                         "with the same last dimension")
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(rng)) != "threefry2x32":
            bits = jax.random.bits(rng, within, jnp.uint16).astype(jnp.uint32)
            return bits[tuple(slice(0, s) for s in shape)]
        k1, k2 = jax.random.key_data(rng)
    else:  # a raw uint32[2] key (jax.random.PRNGKey)
        k1, k2 = rng[0], rng[1]
    *lead, last = shape or (1,)
    counts = (*lead, -(-last // 4))
    full_counts = (*within[:-1], counts[-1]) if shape else counts
    index = jnp.zeros(counts, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(counts))):  # each count's row-major position in `within`
        index = index + jax.lax.broadcasted_iota(jnp.uint32, counts, axis) * jnp.uint32(stride)
        stride *= full_counts[axis]
    words = jnp.stack(threefry2x32_p.bind(k1, k2, jnp.zeros_like(index), index), axis=-1)
    # Each (w1, w2) pair read as four adjacent 16-bit numbers: a bitcast, which XLA fuses into the
    # consumer. Concatenating shifted halves instead made XLA CPU materialise the concatenation
    # (34 -> 10 ms for MiniLM's attention-probability dropout, (32, 12, 128, 128)).
    u16 = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, -1)
    return u16[..., :last].reshape(shape).astype(jnp.uint32)


def dropout(x: jax.Array, rate: float, rng: jax.Array, *, within: Optional[tuple] = None) -> jax.Array:
    """Zero each element with probability `rate` and scale the rest to keep the expectation.

    `rate` is rounded to a multiple of 1/65536 (0.1 -> 0.100006); the scale uses the rounded
    value, so the expectation is exact. `within`: `x` is the leading corner of a tensor of this
    shape (a layer that computes only the first token) and gets the mask that tensor would get
    there, so computing fewer rows leaves the random stream of the rows kept unchanged.
    """
    threshold = round(rate * 65536)
    keep = _uniform_u16(rng, x.shape, within) >= threshold
    return jnp.where(keep, x * (65536.0 / (65536 - threshold)), 0).astype(x.dtype)


class Dropout(nnx.Module):
    """Dropout driven by an explicit key, so train steps stay pure functions of (state, batch)."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, x, *, deterministic: bool, rng: Optional[jax.Array], within: Optional[tuple] = None):
        if deterministic or self.rate == 0.0:
            return x
        if rng is None:
            raise ValueError("dropout in training mode needs rngs=<PRNG key>")
        return dropout(x, self.rate, rng, within=within)


class KeySplitter:
    """Hands out fresh keys from one PRNG key: `keys()`; None in eval mode."""

    def __init__(self, rng: Optional[jax.Array]):
        self._rng, self._count = rng, 0

    def __call__(self) -> Optional[jax.Array]:
        if self._rng is None:
            return None
        self._count += 1
        return jax.random.fold_in(self._rng, self._count)


# fold_in data for a task head's dropout stream, apart from the base model's 1, 2, ... (uint32).
HEAD_STREAM = 2**31 - 1


def head_keys(key: Optional[jax.Array]) -> KeySplitter:
    """Dropout keys for a task head, independent of those its base model used."""
    return KeySplitter(None if key is None else jax.random.fold_in(key, HEAD_STREAM))


def as_key(rngs) -> Optional[jax.Array]:
    """Accept a PRNG key, an nnx.Rngs (its 'dropout' stream) or None."""
    if rngs is None or isinstance(rngs, jax.Array):
        return rngs
    if isinstance(rngs, nnx.Rngs):
        return rngs["dropout"]() if "dropout" in rngs else rngs.default()
    raise TypeError(f"rngs must be a PRNG key or nnx.Rngs, got {type(rngs).__name__}")


# ---------------------------------------------------------------------------------------------
# Families: how HF checkpoints map onto a family's modules.


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
LEGACY_RENAMES = ((re.compile(r"\.gamma$"), ".weight"), (re.compile(r"\.beta$"), ".bias"))


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
        from jaxtune.errors import ModelLoadError

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


def path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested dict -> {path tuple: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


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


def depth_tree(family: Family, config, params: dict) -> dict:
    """A dict shaped like the params holding each parameter's depth (0 .. num_layers + 1)."""
    return unflatten({p: family.depth_of(config, p) for p in flatten(params)})


def call_layer(remat: bool, layer: nnx.Module, *args, deterministic: bool, **static):
    """`layer(*args, deterministic=..., **static)`, rematerialised in the backward pass when `remat`.

    `static`: Python values (not arrays) the layer takes as keywords, e.g. `first_token_only`.
    """
    if not remat:
        return layer(*args, deterministic=deterministic, **static)
    return nnx.remat(lambda mod, *a: mod(*a, deterministic=deterministic, **static))(layer, *args)


def run_layers(layers, remat: bool, x, *args, keys: "KeySplitter", deterministic: bool,
               output_hidden_states: bool = False, first_token_only: bool = False):
    """An encoder's layer stack: `layer(x, *args, next key)` in turn -> (x, hidden states or None).

    `first_token_only`: the last layer computes the first token only (its output is (B, 1, D)).
    """
    hidden = [x]
    for i, layer in enumerate(layers):
        last = first_token_only and i == len(layers) - 1
        x = call_layer(remat, layer, x, *args, keys(), deterministic=deterministic, first_token_only=last)
        hidden.append(x)
    return x, (tuple(hidden) if output_hidden_states else None)


def layered_depth(embed_key: str, layers_key: str, num_layers: Callable[[Any], int]):
    """A depth function: paths through `embed_key` -> 0, `layers_key/i` -> i + 1, the rest L + 1."""

    def depth_of(config, path: tuple) -> int:
        for i, part in enumerate(path):
            if part == embed_key:
                return 0
            if part == layers_key and i + 1 < len(path) and isinstance(path[i + 1], int):
                return path[i + 1] + 1
        return num_layers(config) + 1

    return depth_of
