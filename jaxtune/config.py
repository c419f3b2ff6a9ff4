"""Recipes: YAML files validated into typed, frozen dataclasses.

A recipe has the sections below (`task`, `model`, `data`, `optim`, `train`, `mesh`, `checkpoint`,
`output_dir`). `load_recipe(path, overrides)` reads the YAML, applies `section.key=value` overrides
(values parsed as YAML scalars or lists), and validates every key and type. Every mistake raises
`ConfigError` with one line naming the file, the key and what was wrong.

To add a key: add a typed field with a default to the right dataclass. Validation, overrides,
`jaxtune validate` and the resolved `config.yaml` of a run follow from the type hints.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from jaxtune.errors import ConfigError
from jaxtune.tasks import TASKS as TASK_REGISTRY

# The task names come from the one task registry (a light module: no jax at import).
Task = Literal[tuple(TASK_REGISTRY)]
TASKS = typing.get_args(Task)
OptimizerName = Literal["adamw", "adafactor", "sgd", "lion"]
DType = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelConfig:
    # A local HF folder, an HF hub id (resolved from the local HF cache), or pkg:PACKAGE/path.
    path: Optional[str] = None
    # HF config fields: overrides on top of path's config.json, or (with `model_type` and no
    # path) a model built from scratch with random weights.
    config: dict[str, Any] = field(default_factory=dict)
    dtype: DType = "float32"  # parameters (master weights)
    compute_dtype: Optional[DType] = None  # activations/matmuls; None = dtype
    remat: bool = False  # rematerialise each layer in the backward pass
    num_labels: Optional[int] = None  # None: from the data's labels
    problem_type: Optional[
        Literal["single_label_classification", "multi_label_classification", "regression"]
    ] = None
    dropout: Optional[float] = None  # overrides the checkpoint's hidden/attention dropout
    # A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) for the base in
    # `path`: a LoRA run that starts from its adapters and head (rank, alpha, targets from the folder).
    adapter: Optional[str] = None
    # A folder with tokenizer.json for a text model built from model.config (no model.path)
    tokenizer: Optional[str] = None
    # speech models (wav2vec2, hubert): the convolutional feature encoder does not train, as in the
    # wav2vec 2.0 paper's fine-tuning; set false for a model trained from scratch
    freeze_feature_encoder: bool = True
    # Models with BatchNorm (resnet): normalise by the running statistics while fine-tuning and
    # leave them unchanged (eval-mode BatchNorm, a common choice for small data); the BatchNorm
    # scale and bias still train (optim.freeze freezes them)
    freeze_batchnorm: bool = False


@dataclass(frozen=True)
class AugmentConfig:
    # Image augmentation on the device, inside the jitted train step with the step's RNG
    # (jaxtune.data.augment): reproducible, exact on resume, the same on any mesh.
    crop_scale: Optional[list[float]] = None  # random resized crop area [low, high]; None: no crop
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # crop aspect range
    hflip: bool = False  # random horizontal flips
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0: off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0: off
    mix_prob: float = 1.0  # probability that a batch is mixed (mixup or cutmix on)
    switch_prob: float = 0.5  # both on: probability of cutmix rather than mixup
    label_smoothing: float = 0.0  # soft labels' smoothing (with or without mixing)


@dataclass(frozen=True)
class DataConfig:
    # Data specs: tfds:NAME[/CONFIG][:SPLIT], csv:PATH, tsv:PATH, jsonl:PATH, images:DIR,
    # idx:IMAGES_FILE,LABELS_FILE; PATH may be pkg:PACKAGE/path.
    train: Optional[str] = None
    validation: Optional[str] = None
    test: Optional[str] = None
    data_dir: Optional[str] = None  # TFDS data_dir (local or gs://)
    cache_dir: Optional[str] = None  # where local files become array_record; default ~/.cache/jaxtune
    encoding: str = "utf-8"
    # CSV/TSV quotes: "minimal" reads them as pandas and Python's csv module do by default (a field
    # may be "quoted", with "" for a quote and tabs, commas or line breaks inside); "none": quotes
    # are plain text (files with bare " characters, e.g. 5" screens at the start of a field).
    quoting: Literal["minimal", "none"] = "minimal"
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    image_column: str = "image"
    audio_column: str = "audio"  # speech (task ctc): the column of audio file paths
    # speech: longer recordings are refused (or, with skip_bad_rows, dropped and counted)
    max_seconds: float = 20.0
    prompt_column: Optional[str] = None  # causal-lm pairs: loss only on the response
    response_column: Optional[str] = None
    # causal-lm: prompt / response built from any columns, str.format style ("Sentiment?\n{text}")
    prompt_template: Optional[str] = None
    response_template: Optional[str] = None
    # causal-lm: a column of conversations, [{role, content}, ...] (CSV/TSV: a JSON string of it),
    # rendered with the tokenizer's chat template; loss on the assistant replies
    messages_column: Optional[str] = None
    # auto: render prompt/response pairs as a one-turn chat when the tokenizer has a chat template;
    # none: plain prompt + response + EOS (messages_column needs the template)
    chat_template: Literal["auto", "none"] = "auto"
    # causal-lm prompt/response pairs rendered as a chat: a system message before each pair
    # (None: whatever the template does without one, e.g. SmolLM2's default system prompt)
    system_prompt: Optional[str] = None
    max_length: int = 128
    buckets: Optional[list[int]] = None  # padded lengths; None: powers of two up to max_length
    pack: bool = False  # causal-lm: pack short examples into full sequences
    validation_fraction: float = 0.1  # held out from train when no validation split is given
    test_fraction: float = 0.0  # held out from train when no test split is given
    split_seed: int = 0
    deduplicate: Optional[bool] = None  # None: on for text, off otherwise
    image_size: Optional[int] = None  # None: from the model
    # training-time augmentation for images: true = on the host (crop_scale, hflip below), false =
    # none, a mapping (AugmentConfig) = on the device, inside the train step (mixup / cutmix too)
    augment: Union[bool, AugmentConfig] = True
    num_workers: int = 0  # Grain worker processes preparing batches (0: threads in this process)
    labels: Optional[list[str]] = None  # class names in id order; None: sorted labels of train
    skip_bad_rows: bool = False  # drop (and report) unparseable rows instead of failing
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random resized crop area
    hflip: bool = True  # random horizontal flips when augmenting
    num_threads: int = 2  # threads preparing batches in each process
    prefetch: int = 4  # batches prepared ahead
    # Retention texts (jaxtune.retention): any data spec, scored by the current backbone at step 0
    # and at every evaluation (forgetting, measured); EWC's Fisher is estimated on them
    retention: Optional[str] = None
    retention_column: Optional[str] = None  # None: text_column
    # seq2seq-lm: the source and target columns, a text put before every source (T5's
    # "translate English to German: "), the target side's longest length (None: max_length) and
    # its padded lengths (None: powers of two up to it)
    source_column: str = "source"
    target_column: str = "target"
    source_prefix: str = ""
    max_target_length: Optional[int] = None
    target_buckets: Optional[list[int]] = None


@dataclass(frozen=True)
class UnfreezeConfig:
    # Gradual unfreezing (ULMFiT): the head always trains; the top `group_size` layers train from
    # update 0 and one more group (embeddings count as the lowest layer) every `every` updates.
    every: int = 0  # optimizer updates between unfreezing one more layer group (>= 1)
    group_size: int = 1  # layers per group


@dataclass(frozen=True)
class EWCConfig:
    # Elastic weight consolidation (jaxtune.ewc): strength / 2 * sum F (theta - theta0)^2 added to
    # the loss, F the diagonal Fisher of the pretraining objective on data.retention (scaled to mean
    # 1 over the penalised weights, so strength reads like an L2 coefficient), from `samples` draws
    strength: float = 1.0
    samples: int = 256


@dataclass(frozen=True)
class OptimConfig:
    name: OptimizerName = "adamw"
    lr: float = 5e-5
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup: float = 0.0  # steps (>= 1) or a fraction of total steps (< 1)
    end_lr: float = 0.0  # final lr of linear/cosine decay, as a fraction of lr
    weight_decay: float = 0.0
    decay_toward: Literal["zero", "pretrained"] = "zero"
    decay_embeddings: bool = False
    layerwise_lr_decay: Optional[float] = None
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # {path regex: factor}
    freeze: list[str] = field(default_factory=list)  # path regexes
    unfreeze: Optional[UnfreezeConfig] = None
    clip_norm: Optional[float] = 1.0
    accumulate: int = 1
    b1: float = 0.9  # adamw, lion
    b2: Optional[float] = None  # None: 0.999 for adamw, 0.99 for lion (adafactor: its own decay)
    eps: Optional[float] = None  # None: 1e-8 for adamw, 1e-30 for adafactor
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    ewc: Optional[EWCConfig] = None  # None: no EWC penalty


@dataclass(frozen=True)
class EarlyStoppingConfig:
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 3  # evaluations without improvement before stopping
    min_delta: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32
    eval_batch_size: Optional[int] = None  # None: batch_size
    steps: Optional[int] = None  # when set, wins over epochs (as HF's max_steps does)
    epochs: Optional[float] = None  # None with steps None: 1 epoch
    eval_every: Optional[int] = None  # steps; None: once per epoch (and at the end)
    log_every: int = 10
    seed: int = 0
    early_stopping: Optional[EarlyStoppingConfig] = None
    metric: str = "accuracy"  # the eval metric that picks the best checkpoint
    metric_mode: Literal["min", "max"] = "max"
    # seq2seq-lm: label smoothing of the target tokens' cross-entropy (0: none)
    label_smoothing: float = 0.0
    # seq2seq-lm evaluation: targets generated with this many beams (1: greedy) for BLEU, chrF,
    # exact match and the sequence error rate
    eval_num_beams: int = 1


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, Optional[Union[str, list[str]]]] = field(default_factory=dict)  # logical -> mesh


@dataclass(frozen=True)
class CheckpointConfig:
    every: Optional[int] = None  # steps between extra checkpoints; evals and the end always save
    keep: int = 2  # the newest checkpoints kept (2: one to fall back on if the last is damaged)
    keep_best: int = 1  # ... plus the best by train.metric (0: export the last step instead)
    async_save: bool = True  # write in the background while training goes on


@dataclass(frozen=True)
class LoRAConfig:
    # Low-rank adapters (jaxtune.lora): W x + alpha / rank * B A x on the `targets` kernels; only
    # the adapters and `train_also` train, the base is frozen (and re-read from model.path).
    rank: int = 8
    alpha: Optional[float] = None  # None: 2 * rank
    dropout: float = 0.0  # on the adapters' input (PEFT's lora_dropout)
    targets: Optional[str] = None  # a param path regex; None: the family's attention + MLP kernels
    train_also: Optional[list[str]] = None  # path regexes trained in full; None: a classifier's head
    # QLoRA: the adapted (frozen) kernels stored quantized with blockwise scales, dequantized in the matmul
    base_dtype: Optional[Literal["int8", "nf4"]] = None


@dataclass(frozen=True)
class Recipe:
    task: Task
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: Optional[LoRAConfig] = None  # None: full fine-tuning
    output_dir: Optional[str] = None  # None: runs/<recipe name>
    name: Optional[str] = None  # None: the recipe file's stem


def check_augment(a: AugmentConfig, src: str) -> None:
    """data.augment's ranges, one line each."""
    def bad(msg):
        raise ConfigError(f"{src}: data.augment.{msg}")
    if a.crop_scale is not None and not (len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1):
        bad(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {a.crop_scale}")
    if not (len(a.crop_ratio) == 2 and 0 < a.crop_ratio[0] <= a.crop_ratio[1]):
        bad(f"crop_ratio must be [low, high] with 0 < low <= high, got {a.crop_ratio}")
    for k in ("mixup", "cutmix"):
        if getattr(a, k) < 0:
            bad(f"{k} must be >= 0 (a Beta distribution's alpha; 0: off), got {getattr(a, k):g}")
    for k in ("mix_prob", "switch_prob"):
        if not 0 <= getattr(a, k) <= 1:
            bad(f"{k} must be in [0, 1], got {getattr(a, k):g}")
    if not 0 <= a.label_smoothing < 1:
        bad(f"label_smoothing must be in [0, 1), got {a.label_smoothing:g}")


# ---------------------------------------------------------------------------------------------
# Validation: walk the raw YAML data against the dataclass type hints.


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, src: str) -> Any:
    """Return `value` checked (and, for dataclasses, built) as type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        mappings = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(mappings) == 1:  # its own errors (an unknown key) name the key
            return _convert(value, mappings[0], where, src)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where, src)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{src}: {where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            more = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"{src}: {where}: {value!r} is not one of {', '.join(map(str, choices))}{more}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {where}: expected a mapping of keys, got {value!r}")
        return _build(tp, value, where, src)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{src}: {where}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {where}: expected a mapping, got {value!r}")
        ktp, vtp = typing.get_args(tp)
        return {
            _convert(k, ktp, where, src): _convert(v, vtp, f"{where}.{k}", src)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: {where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src}: {where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 5e-5 (no dot) as a string; accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{src}: {where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src}: {where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config type {tp!r} at {where} is not supported by the validator")


def _build(cls, raw: dict, where: str, src: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{(where + '.') if where else ''}{near[0]}'?" if near else ""
            raise ConfigError(f"{src}: unknown key '{path}'{hint}")
        kwargs[key] = _convert(value, hints[key], path, src)
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            path = f"{where}.{name}" if where else name
            raise ConfigError(f"{src}: missing required key '{path}'")
    return cls(**kwargs)


def _check(recipe: Recipe, src: str) -> None:
    """Cross-field rules the types cannot express."""
    m, t, o, d = recipe.model, recipe.train, recipe.optim, recipe.data
    if m.path is None and "model_type" not in m.config:
        raise ConfigError(
            f"{src}: missing required key 'model.path' (or 'model.config.model_type' for a model from scratch)"
        )
    positive = {
        "train.batch_size": t.batch_size,
        "train.log_every": t.log_every,
        "data.max_length": d.max_length,
        "train.eval_num_beams": t.eval_num_beams,
        "optim.accumulate": o.accumulate,
        "checkpoint.keep": recipe.checkpoint.keep,
    }
    for opt in ("train.steps", "train.eval_every", "train.eval_batch_size", "checkpoint.every"):
        section, key = opt.split(".")
        v = getattr(getattr(recipe, section), key)
        if v is not None:
            positive[opt] = v
    if t.epochs is not None:
        positive["train.epochs"] = t.epochs
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{src}: {k} must be positive, got {v}")
    check_optim(o, src)
    if recipe.checkpoint.keep_best < 0:
        raise ConfigError(f"{src}: checkpoint.keep_best must be >= 0, got {recipe.checkpoint.keep_best}")
    es = t.early_stopping
    if es is not None and es.patience < 1:
        raise ConfigError(f"{src}: train.early_stopping.patience must be >= 1, got {es.patience}")
    if es is not None and es.min_delta < 0:
        raise ConfigError(f"{src}: train.early_stopping.min_delta must be >= 0, got {es.min_delta}")
    if t.steps is not None and o.warmup >= 1 and o.warmup > t.steps:
        raise ConfigError(
            f"{src}: optim.warmup ({o.warmup:g} steps) is longer than training (train.steps={t.steps})"
        )
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"{src}: train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    if t.label_smoothing and recipe.task != "seq2seq-lm":
        raise ConfigError(f"{src}: train.label_smoothing applies to task seq2seq-lm, not {recipe.task}")
    if d.max_target_length is not None and d.max_target_length <= 0:
        raise ConfigError(f"{src}: data.max_target_length must be positive, got {d.max_target_length}")
    for k in ("validation_fraction", "test_fraction"):
        v = getattr(d, k)
        if not 0 <= v < 1:
            raise ConfigError(f"{src}: data.{k} must be in [0, 1), got {v}")
    if d.validation_fraction + d.test_fraction >= 1:
        raise ConfigError(f"{src}: data.validation_fraction + data.test_fraction must be < 1")
    if isinstance(d.augment, AugmentConfig):
        check_augment(d.augment, src)
    for k in ("data", "fsdp", "tensor"):
        v = getattr(recipe.mesh, k)
        if v == 0 or v < -1:
            raise ConfigError(f"{src}: mesh.{k} must be a positive size or -1, got {v}")
    if recipe.model.adapter is not None and recipe.lora is not None:
        raise ConfigError(f"{src}: model.adapter brings its own LoRA settings (rank, alpha, targets, head); "
                          "remove the lora section")
    if recipe.model.adapter is not None and recipe.model.path is None:
        raise ConfigError(f"{src}: model.adapter needs model.path, the base model the adapter was trained on")
    if o.ewc is not None and d.retention is None:
        raise ConfigError(f"{src}: optim.ewc estimates its Fisher on data.retention; set data.retention")
    if o.ewc is not None and (recipe.lora is not None or recipe.model.adapter is not None):
        raise ConfigError(f"{src}: optim.ewc applies to full fine-tuning; a LoRA run keeps its base frozen already")
    lo = recipe.lora
    if lo is not None:  # what needs the model (targets that are not matrices) is checked by build
        if lo.rank < 1:
            raise ConfigError(f"{src}: lora.rank must be >= 1, got {lo.rank}")
        if lo.alpha is not None and lo.alpha < 0:
            raise ConfigError(f"{src}: lora.alpha must be >= 0, got {lo.alpha:g}")
        if not 0 <= lo.dropout < 1:
            raise ConfigError(f"{src}: lora.dropout must be in [0, 1), got {lo.dropout:g}")


def check_optim(o: OptimConfig, src: str = "") -> None:
    """The optim section's own rules (also run by `jaxtune.optim.make_optimizer`)."""
    at = f"{src}: " if src else ""

    def bad(msg: str):
        raise ConfigError(f"{at}optim.{msg}")

    names = typing.get_args(OptimizerName)
    if o.name not in names:
        near = difflib.get_close_matches(str(o.name), names, n=1)
        bad(f"name: {o.name!r} is not one of {', '.join(names)}" + (f" (did you mean '{near[0]}'?)" if near else ""))
    if o.schedule not in ("constant", "linear", "cosine"):
        bad(f"schedule: {o.schedule!r} is not one of constant, linear, cosine")
    if o.decay_toward not in ("zero", "pretrained"):
        bad(f"decay_toward: {o.decay_toward!r} is not one of zero, pretrained")
    if o.lr < 0:
        bad(f"lr must be >= 0, got {o.lr}")
    if o.weight_decay < 0:
        bad(f"weight_decay must be >= 0, got {o.weight_decay}")
    if o.warmup < 0:
        bad(f"warmup must be >= 0, got {o.warmup}")
    if o.warmup >= 1 and o.warmup != int(o.warmup):
        bad(f"warmup must be a whole number of steps (>= 1) or a fraction (< 1), got {o.warmup}")
    if o.end_lr < 0:
        bad(f"end_lr must be >= 0 (a fraction of optim.lr), got {o.end_lr}")
    if o.layerwise_lr_decay is not None and not 0 < o.layerwise_lr_decay <= 1:
        bad(f"layerwise_lr_decay must be in (0, 1], got {o.layerwise_lr_decay}")
    if o.clip_norm is not None and o.clip_norm <= 0:
        bad(f"clip_norm must be positive or null, got {o.clip_norm}")
    if o.accumulate < 1:
        bad(f"accumulate must be positive, got {o.accumulate}")
    for k in ("b1", "b2", "momentum"):
        v = getattr(o, k)
        if v is not None and not 0 <= v < 1:
            bad(f"{k} must be in [0, 1), got {v}")
    if o.eps is not None and o.eps <= 0:
        bad(f"eps must be positive, got {o.eps}")
    for key, patterns in (("lr_multipliers", list(o.lr_multipliers)), ("freeze", list(o.freeze))):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                bad(f"{key}: invalid regex {pattern!r}: {e}")
    for pattern, factor in o.lr_multipliers.items():
        if factor < 0:
            bad(f"lr_multipliers: factor for {pattern!r} must be >= 0, got {factor}")
    if o.ewc is not None:
        if o.ewc.strength < 0:
            bad(f"ewc.strength must be >= 0, got {o.ewc.strength}")
        if o.ewc.samples < 1:
            bad(f"ewc.samples must be >= 1, got {o.ewc.samples}")
    if o.unfreeze is not None:
        if o.unfreeze.every < 1:
            bad(f"unfreeze.every must be >= 1 (updates between groups), got {o.unfreeze.every}")
        if o.unfreeze.group_size < 1:
            bad(f"unfreeze.group_size must be >= 1, got {o.unfreeze.group_size}")


# ---------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"malformed override '{text}': expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed override '{text}': value is not valid YAML ({e.problem})")
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = dict(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override '{text}': '{'.'.join(keys[: i + 1])}' is not a section"
                )
            node[k] = child = dict(child)
            node = child
        node[keys[-1]] = value
    return raw


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {path}")
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror}")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {what}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return raw


def from_dict(raw: dict, src: str = "<recipe>") -> Recipe:
    recipe = _build(Recipe, raw, "", src)
    _check(recipe, src)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe. `path` is a file or a bundled recipe's name."""
    path = find_recipe(path)
    raw = apply_overrides(read_yaml(path), list(overrides))
    raw.setdefault("name", path.stem)
    return from_dict(raw, str(path))


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def replace(recipe: Recipe, **changes) -> Recipe:
    """`replace(r, **{'train.steps': 3})`: a validated copy with dotted keys changed."""
    raw = to_dict(recipe)  # asdict copies deeply
    for key, value in changes.items():
        node = raw
        *head, last = key.split(".")
        for k in head:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
        node[last] = value
    return from_dict(raw, f"<{recipe.name}>")


# ---------------------------------------------------------------------------------------------
# Bundled recipes

RECIPES_DIR = Path(__file__).parent / "recipes"


def bundled_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def find_recipe(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"recipe file not found: {p}")
        return p
    bundled = bundled_recipes()
    if str(name_or_path) in bundled:
        return bundled[str(name_or_path)]
    near = difflib.get_close_matches(str(name_or_path), list(bundled), n=1)
    hint = f"; did you mean '{near[0]}'?" if near else f"; bundled: {', '.join(bundled)}"
    raise ConfigError(f"recipe not found: '{name_or_path}' is neither a file nor a bundled recipe{hint}")


def recipe_header(path: Path) -> str:
    """The first comment line of a recipe after its command line (its one-line description)."""
    lines = [l[1:].strip() for l in path.read_text().splitlines() if l.startswith("#")]
    desc = [l for l in lines if l and not l.startswith("jaxtune ")]
    return desc[0] if desc else ""
