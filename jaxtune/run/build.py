"""Assemble a run from a recipe: `build(recipe) -> Run`. Nothing is printed or written here.

The order: the mesh plan; the model folder, its config.json and `data.max_length` against the
model's positions (`check_model`: each problem is one line naming its file, before any work); the
tokenizer or image settings; the data (its labels size the model's head and become `id2label`);
the model (`from_pretrained` straight onto its shardings, or `from_config` when `model.config`
has `model_type` and there is no `model.path`); the task (shaped by the model's config); the
optimizer (`total_steps` = optimizer updates = train steps / `optim.accumulate`); the TrainState
as ShapeDtypeStructs on their shardings (created or restored later, by `jaxtune.run.session`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from jaxtune import lora, parallel
from jaxtune.data import Data, build_data as build_data_for_task, image_settings_from_model, load_tokenizer
from jaxtune.data.audio import AudioFormat, AudioProcessor, AudioSettings, CharVocab
from jaxtune.errors import ConfigError, ModelLoadError
from jaxtune.models import (
    abstract_model, family_of, flatten, from_config, from_pretrained, get_family, hf, labels_differ, split,
)
from jaxtune.models.pretrained import make_config
from jaxtune.models.trees import path_str
from jaxtune.models.trees import batch_stats
from jaxtune.optim import Optimizer, make_optimizer, pretrained_tree
from jaxtune.paths import resolve_path
from jaxtune.retention import Retention, build_retention
from jaxtune.tasks import get_task
from jaxtune.tasks.base import Task


@dataclass
class Run:
    """Everything a run needs, assembled; the state itself is not created yet."""

    recipe: Any  # the validated Recipe
    plan: parallel.Plan
    data: Data
    model: Any  # the jaxtune model (its arrays are the initial params)
    fresh: list  # param paths initialised from scratch (all of them without model.path)
    task: Task
    total_steps: int
    optimizer: Optimizer
    param_shardings: Any
    abstract: Any  # the TrainState as ShapeDtypeStructs with shardings
    preprocessing: Any  # folder whose tokenizer / preprocessor files an export copies; speech: an AudioProcessor
    lora: Optional[lora.LoRASpec] = None  # a LoRA run: params = adapters + train_also
    retention: Optional[Retention] = None  # data.retention: scored at step 0 and every evaluation

    @property
    def has_validation(self) -> bool:
        return "validation" in self.data.splits

    @property
    def eval_every(self) -> int:
        return self.recipe.train.eval_every or self.data.steps_per_epoch

    @property
    def params(self) -> dict:
        """The params that train (a LoRA run: adapters + train_also); the initial values."""
        params = split(self.model)[1]
        return lora.partition(self.lora, params)[0] if self.lora else params

    @property
    def frozen(self) -> dict:
        """What does not train, the TrainState's `model_state` (a LoRA run's base), never
        checkpointed: a run reads it from model.path again."""
        return lora.partition(self.lora, split(self.model)[1])[1] if self.lora else {}

    @property
    def batch_stats(self) -> dict:
        """A model with BatchNorm: its running statistics (the initial values), the TrainState's
        `model_state`, which each train step updates and checkpoints save; `{}` otherwise."""
        return {} if self.lora else batch_stats(self.model)

    def export_params(self, state) -> dict:
        """The params an export writes: a LoRA run's adapters merged into the base."""
        if not self.lora:
            return state.params
        return lora.merged_params(self.lora, lora.combine(state.params, state.model_state))


def max_positions(config) -> Optional[int]:
    """The longest sequence a model's position embeddings hold (None: no such limit)."""
    n = getattr(config, "max_position_embeddings", None)
    if n is None:
        return None
    if config.model_type in ("roberta", "xlm-roberta"):  # positions count from pad_token_id + 1
        n -= (config.pad_token_id or 0) + 1
    return n


def check_model(recipe, *, lengths: bool = True) -> dict:
    """Check what the model folder must supply before anything reads it: the folder, its
    config.json, the model_type, and (text tasks, `lengths`) `data.max_length` within the model's
    positions: a longer sequence would read past the position embeddings, where nnx.Embed's
    `jnp.take` returns NaN rather than failing. Returns the HF config dict."""
    m = recipe.model
    where = hf.config_source(hf.resolve_model_dir(m.path)) if m.path else "model.config"
    config = _hf_config(recipe)
    family = get_family(config.get("model_type"), where)
    if lengths and get_task(recipe.task).modality != "image":
        try:
            cfg = make_config(family, config)
        except ModelLoadError as e:
            raise ModelLoadError(f"{where}: {e}") from None
        limit = max_positions(cfg)
        if limit is not None and recipe.data.max_length > limit:
            key = type(cfg).attribute_map.get("max_position_embeddings", "max_position_embeddings")
            raise ConfigError(
                f"data.max_length ({recipe.data.max_length}) is longer than the model's {limit} positions "
                f"({key} {getattr(cfg, key)} in {where}); set data.max_length={limit} or less"
            )
    if m.freeze_batchnorm:  # a setting that would change nothing is a mistake worth one line
        head = family.head(get_task(recipe.task).head)
        if not batch_stats(abstract_model(head, make_config(family, config))):
            raise ConfigError(f"model.freeze_batchnorm: {family.model_type} models have no BatchNorm ({where})")
    return config


def load_preprocessing(recipe):
    """(tokenizer, image settings, folder whose tokenizer/preprocessor files an export copies),
    as the task's modality needs; the model folder and its config.json are checked first."""
    check_model(recipe, lengths=False)
    path = recipe.model.path
    if get_task(recipe.task).modality == "image":
        return None, (image_settings_from_model(path) if path else None), path
    if get_task(recipe.task).modality == "audio":
        # speech: the folder's feature extractor and vocabulary, else data.labels as the vocabulary
        # (what `jaxtune eval` passes: the model's), else one built from the training transcripts
        folder = hf.resolve_model_dir(path) if path else None
        labels = recipe.data.labels
        vocab = CharVocab.from_model(folder) or (CharVocab(tuple(labels)) if labels else None)
        return AudioFormat(AudioSettings.from_model(folder), vocab), None, path
    if not path and recipe.model.tokenizer:  # a model from model.config: its export saves this tokenizer
        tokenizer = load_tokenizer(recipe.model.tokenizer)
        return tokenizer, None, tokenizer
    if not path:
        raise ConfigError(
            "a text model built from model.config alone has no tokenizer; set model.path (or "
            "model.tokenizer) to a folder with tokenizer.json"
        )
    return load_tokenizer(path), None, path


def build_data(recipe, tokenizer=None, images=None) -> Data:
    """The recipe's data; for speech `tokenizer` is the AudioFormat `load_preprocessing` gives."""
    t = recipe.train
    audio = tokenizer if isinstance(tokenizer, AudioFormat) else None
    return build_data_for_task(
        recipe.data, recipe.task, tokenizer=None if audio else tokenizer, image_processor=images,
        batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, seed=t.seed,
        problem_type=recipe.model.problem_type, audio=audio, decoder_start_token_id=decoder_start(recipe),
    )


def decoder_start(recipe) -> Optional[int]:
    """An encoder-decoder's decoder_start_token_id (its config's, as jaxtune reads it): the token
    seq2seq-lm batches start the decoder inputs with; None for other tasks."""
    if get_task(recipe.task).data_kind != "seq2seq":
        return None
    config = _hf_config(recipe)
    return getattr(make_config(get_family(config.get("model_type")), config), "decoder_start_token_id", None)


def configured_task(recipe, config) -> Task:
    """The recipe's task for a model config, with the recipe's task settings where it takes them
    (seq2seq-lm: label smoothing, evaluation beams, target length, tokenizer)."""
    task = get_task(recipe.task, config)
    return task.with_recipe(recipe) if hasattr(task, "with_recipe") else task


def speech_processor(data: Data, audio: AudioFormat) -> AudioProcessor:
    """A speech run's vocabulary (the model folder's, or the one built from the transcripts) and
    feature-extractor settings: what its export writes beside the weights."""
    return AudioProcessor(audio.vocab or CharVocab(tuple(data.label_names)), audio.settings)


def speech_overrides(processor: AudioProcessor) -> dict:
    """The CTC head's size and blank follow the vocabulary."""
    return {"vocab_size": len(processor.vocab.tokens), "pad_token_id": processor.vocab.blank_id}


def _hf_config(recipe) -> dict:
    """The model's HF config dict: model.path's config.json updated by model.config."""
    m = recipe.model
    base = hf.read_config(hf.resolve_model_dir(m.path)) if m.path else {}
    return {**base, **m.config}


def build_model(recipe, plan, *, num_labels=None, label_names=None, problem_type=None,
                config_overrides: Optional[dict] = None) -> tuple[Any, list]:
    """(model on the plan's shardings, param paths initialised from scratch); `config_overrides`
    (what the data decides, e.g. a CTC head's vocabulary size) win over model.config."""
    m = recipe.model
    head = get_task(recipe.task).head
    hf_config = _hf_config(recipe)
    family = get_family(hf_config.get("model_type"))
    overrides = {**family.config_cls.dropout_overrides(m.dropout), **m.config, **(config_overrides or {})}
    num_labels = m.num_labels or num_labels
    id2label = label_names if label_names and num_labels == len(label_names) else None
    kwargs = dict(
        num_labels=num_labels, id2label=id2label, problem_type=m.problem_type or problem_type,
        dtype=m.dtype, compute_dtype=m.compute_dtype, remat=m.remat,
    )
    if m.path is None:
        model = from_config({**hf_config, **overrides}, head, shardings=plan.param_shardings,
                            seed=recipe.train.seed, **kwargs)
        return model, list(flatten(split(model)[1]))
    model, info = from_pretrained(
        m.path, head, config_overrides=overrides, shardings=plan.param_shardings,
        ignore_mismatched_sizes=labels_differ(hf_config, num_labels), seed=recipe.train.seed,
        output_loading_info=True, **kwargs,
    )
    return model, info.get("fresh", [])


def total_train_steps(recipe, steps_per_epoch: int) -> int:
    t = recipe.train
    if t.steps is not None:
        return t.steps
    return max(1, math.ceil((t.epochs if t.epochs is not None else 1.0) * steps_per_epoch))


FEATURE_ENCODER = r"(^|/)feature_extractor/"  # a speech model's convolutional feature encoder


def optim_config(recipe, params):
    """recipe.optim, plus a speech model's feature encoder among the frozen patterns when
    model.freeze_feature_encoder (the default)."""
    o = recipe.optim
    speech = any(re.search(FEATURE_ENCODER, path_str(p)) for p in flatten(params))
    if speech and recipe.model.freeze_feature_encoder and FEATURE_ENCODER not in o.freeze:
        return dataclasses.replace(o, freeze=[*o.freeze, FEATURE_ENCODER])
    return o


def build_optimizer(recipe, model, params, fresh: list, total_steps: int) -> Optimizer:
    family = family_of(model)
    updates = max(1, total_steps // recipe.optim.accumulate)
    pretrained = pretrained_tree(params, fresh) if recipe.model.path else None
    return make_optimizer(
        optim_config(recipe, params), params, pretrained=pretrained,
        depth_of=functools.partial(family.depth_of, model.config),
        num_layers=family.num_layers(model.config), total_steps=updates,
    )


def build(recipe, *, tokenizer=None, images=None, preprocessing: Optional[str] = None) -> Run:
    """Assemble `recipe` (a validated Recipe). Tokenizer / image settings default to the model
    folder's (`load_preprocessing`)."""
    plan = parallel.Plan.from_config(recipe.mesh)
    plan.local_batch_size(recipe.train.batch_size)  # one-line error when it cannot split
    check_model(recipe)  # the model folder, config.json and data.max_length, before any work
    check_lora(recipe)  # lora.targets / train_also against the model's paths, before any work
    if tokenizer is None and images is None:
        tokenizer, images, preprocessing = load_preprocessing(recipe)
    data = build_data(recipe, tokenizer, images)
    overrides = None
    if isinstance(tokenizer, AudioFormat):  # speech: the export writes the vocabulary and audio settings
        preprocessing = speech_processor(data, tokenizer)
        overrides = speech_overrides(preprocessing)
    model, fresh = build_model(recipe, plan, num_labels=data.num_labels, label_names=data.label_names,
                               problem_type=data.problem_type, config_overrides=overrides)
    spec = apply_lora(recipe, model)
    params, frozen = split(model)[1], {}
    param_sh, frozen_sh = plan.param_shardings(model), None
    if spec:  # only the adapters and train_also are params; the frozen base is model_state
        params, frozen = lora.partition(spec, params)
        param_sh, frozen_sh = lora.partition(spec, param_sh)
    if spec and batch_stats(model):  # model_state would have to hold both the base and the statistics
        raise ConfigError(f"LoRA is not supported for {model.config.model_type} models (BatchNorm); fine-tune "
                          "them in full (model.freeze_batchnorm: true keeps their statistics fixed)")
    total = total_train_steps(recipe, data.steps_per_epoch)
    optimizer = build_optimizer(recipe, model, params, fresh, total)
    abstract = plan.abstract_state(params, optimizer, param_sh, rng=recipe.train.seed,
                                   model_state=frozen or batch_stats(model), model_state_shardings=frozen_sh)
    retention = build_retention(recipe, plan=plan, model=model, tokenizer=tokenizer, spec=spec,
                                abstract_state=abstract)
    return Run(recipe=recipe, plan=plan, data=data, model=model, fresh=fresh,
               task=configured_task(recipe, model.config), total_steps=total, optimizer=optimizer,
               param_shardings=param_sh, abstract=abstract, preprocessing=preprocessing, lora=spec,
               retention=retention)


def is_lora_recipe(recipe) -> bool:
    """A LoRA run: a `lora` section, or a PEFT adapter in `model.adapter` (which brings its own)."""
    return recipe.lora is not None or recipe.model.adapter is not None


def check_lora(recipe) -> None:
    """The recipe's lora targets and train_also against the (abstract) model, or its PEFT
    adapter folder's files: one-line errors."""
    if recipe.model.adapter is not None:
        lora.read_adapter(resolve_path(recipe.model.adapter))
    lo = recipe.lora
    if lo is None:
        return
    family = get_family(_hf_config(recipe).get("model_type"))
    config = make_config(family, _hf_config(recipe))
    lora.select(abstract_model(family.head(get_task(recipe.task).head), config), lo.targets, lo.train_also)


def apply_lora(recipe, model) -> Optional[lora.LoRASpec]:
    """The recipe's `lora` section on `model` (in place), seeded by train.seed, or its PEFT adapter
    (`model.adapter`: rank, alpha, targets, head and values from the folder); None without either."""
    if recipe.model.adapter is not None:
        return lora.load_peft(model, resolve_path(recipe.model.adapter), seed=recipe.train.seed)
    lo = recipe.lora
    if lo is None:
        return None
    return lora.apply(model, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets,
                      train_also=lo.train_also, seed=recipe.train.seed, base_dtype=lo.base_dtype)


__all__ = ["Run", "apply_lora", "build", "build_data", "build_model", "build_optimizer", "check_lora", "check_model",
           "is_lora_recipe",
           "load_preprocessing", "max_positions", "total_train_steps"]
