"""Using a trained model: `jaxtune eval`, `jaxtune export` and `jaxtune predict`.

    loaded = load("runs/quickstart")               # a run folder: its best checkpoint
    loaded = load("runs/quickstart", step=200)     # ... or a given step
    loaded = load("runs/quickstart/export")        # an HF folder (config.json + weights)
    loaded = load("model.Q4_1.gguf")               # a GGUF file (its tokenizer included)
    metrics = evaluate_path("runs/quickstart", split="test")
    export_run("runs/quickstart", "out/", step=None)           # best (else latest) checkpoint
    predict(load("runs/quickstart/export"), ["great day!"])     # per input: label + probabilities
    predict(load("runs/lm"), ["3 plus 4 is"], max_new_tokens=20)  # causal-lm: generated text

A run folder is recognised by `config.yaml` + `model_config.json` (`jaxtune.run.folder`); its
weights come from `checkpoints/` (params only are read), or from `export/` when no checkpoint is
left. Labels: evaluation data is mapped onto the model's own `id2label`, so ids always agree.
Prediction is the task's (`Task.predict` and `Task.format` in `jaxtune/tasks/<task>.py`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune import lora
from jaxtune.checkpoint import CheckpointDamaged, Checkpoints
from jaxtune.config import apply_overrides, from_dict, load_recipe, to_dict
from jaxtune.data.audio import AudioProcessor, AudioSettings, CharVocab
from jaxtune.errors import ConfigError, DataError, JaxtuneError
from jaxtune.models import (
    abstract_model, from_pretrained, get_family, hf, load_weights, make_config, merge, save_pretrained,
)
from jaxtune.models import split as split_model  # `split` is also a data split below
from jaxtune.models.trees import batch_stats
from jaxtune.parallel import Plan
from jaxtune.run.build import apply_lora, build_data, is_lora_recipe, load_preprocessing
from jaxtune.run.folder import CHECKPOINTS, CONFIG, EXPORT, is_run_dir, read_model_config
from jaxtune.tasks import get_task
from jaxtune.tasks.model_fns import evaluate, make_eval_fn
from jaxtune.train import make_eval_step

_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


@dataclass
class Loaded:
    model: Any  # a jaxtune model holding the weights to use
    task: str
    source: str  # e.g. 'runs/x, checkpoint step 120 (best)' or 'path/to/folder'
    tokenizer_dir: Optional[str]  # folder with tokenizer / preprocessor files
    recipe: Any = None  # the run's Recipe (run folders only)
    step: Optional[int] = None

    @property
    def labels(self) -> Optional[list[str]]:
        """The model's class names in id order, unless they are HF's generic LABEL_i."""
        names = getattr(self.model.config, "id2label", None)
        if not names or all(_GENERIC_LABEL.match(str(n)) for n in names):
            return None
        return [str(n) for n in names]

    def task_object(self):
        """The `jaxtune.tasks` Task of this model (its predict, format, metrics), with the run's task
        settings where the task takes them (seq2seq-lm: target length, beams, tokenizer)."""
        task = get_task(self.task, self.model.config)
        return task.for_loaded(self) if hasattr(task, "for_loaded") else task


def _plan() -> Plan:
    """All local devices on the data axis: inference never needs more."""
    return Plan.from_config(None)


def _folder_task(folder) -> str:
    config = hf.read_config(hf.resolve_model_dir(folder))
    family = get_family(config.get("model_type"))
    for arch in config.get("architectures") or ():
        task = family.task_of(arch)
        if task and task != "base":
            return task
    raise JaxtuneError(f"{folder}: config.json names no task head (architectures: "
                       f"{config.get('architectures')}); export a fine-tuned model first")


def load(path, *, step: Optional[int] = None, best: bool = True, plan=None) -> Loaded:
    """A run folder's checkpoint (`step`, else the best, else the latest) or an HF model folder."""
    p = Path(path)
    plan = plan or _plan()
    if is_run_dir(p):
        return _load_run(p, step=step, best=best, plan=plan)
    if step is not None:
        raise JaxtuneError(f"{p} is not a run folder (config.yaml + model_config.json); --step needs one")
    if hf.is_gguf(p):  # a GGUF file (also pkg:PACKAGE/file.gguf): config, weights and tokenizer in one
        p = hf.resolve_model_dir(path)
    elif not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else "is neither a run folder (config.yaml + checkpoints/) nor a model folder (config.json)"
        raise JaxtuneError(f"{p} {what}")
    task = _folder_task(p)
    model = from_pretrained(p, task, shardings=plan.param_shardings)
    return Loaded(model, task, str(p), str(p))


def _choose_step(run: Path, ckpt: Checkpoints, steps: list[int], step: Optional[int], best: bool):
    """(step, why) of the checkpoint to read."""
    if step is not None:
        if step not in steps:
            raise JaxtuneError(f"{run} has no checkpoint at step {step}; available: {', '.join(map(str, steps))}")
        return step, "requested"
    chosen = (ckpt.best_step() if best else None) or max(steps)
    return chosen, "best" if best and chosen == ckpt.best_step() else "latest"


def _load_run(run: Path, *, step: Optional[int], best: bool, plan) -> Loaded:
    recipe = load_recipe(run / CONFIG)
    task, hf_config = read_model_config(run)
    ckpt_dir = run / CHECKPOINTS
    steps, ckpt = [], None
    if ckpt_dir.is_dir():
        ckpt = Checkpoints(ckpt_dir, recipe.checkpoint, metric=recipe.train.metric,
                           mode=recipe.train.metric_mode, read_only=True)
        steps = ckpt.steps()
    if not steps:
        if ckpt is not None:
            ckpt.close()
        if step is None and (run / EXPORT / "config.json").is_file():
            loaded = load(run / EXPORT, plan=plan)
            loaded.recipe, loaded.source = recipe, f"{run / EXPORT} (no checkpoint left in {run})"
            return loaded
        raise JaxtuneError(f"{run} has no checkpoint" + (" and no export/" if step is None else ""))
    try:
        chosen, why = _choose_step(run, ckpt, steps, step, best)
        family = get_family(hf_config.get("model_type"))
        abstract = abstract_model(family.head(task), make_config(family, hf_config))
        graphdef, abs_params, rest = split_model(abstract)
        if is_lora_recipe(recipe):  # adapters + train_also from the checkpoint, the base from model.path
            params = _lora_run_params(recipe, task, hf_config, plan, ckpt, chosen)
        else:
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_params,
                                  plan.param_shardings(abstract))
            params = ckpt.restore_params(chosen, target)
        stats = batch_stats(abstract)
        if stats:  # a BatchNorm model: its running statistics trained with it, in the TrainState's model_state
            replicated = NamedSharding(plan.mesh, PartitionSpec())
            stats = ckpt.restore_model_state(chosen, jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), stats))
    except CheckpointDamaged as e:  # read-only here: say which others exist, move nothing
        others = [s for s in steps if s != e.step]
        raise CheckpointDamaged(f"{e}; other checkpoints: {', '.join(map(str, others))} (--step N)"
                                if others else f"{e}; it is the only checkpoint of {run}", e.step) from None
    finally:
        ckpt.close()
    model = merge(graphdef, params, rest)
    if stats:
        nnx.update(model, stats)
    return Loaded(model, task, f"{run}, checkpoint step {chosen} ({why})",
                  recipe.model.path or recipe.model.tokenizer, recipe=recipe, step=chosen)


def lora_run_model(recipe, task: str, hf_config: dict, plan):
    """A LoRA run's model before training: the base from model.path (the run's head config), the
    recipe's adapters on it. The head, absent from the base, starts fresh and quietly: the
    checkpoint holds the trained one."""
    family = get_family(hf_config.get("model_type"))
    folder = hf.resolve_model_dir(recipe.model.path)
    quiet = logging.getLogger("jaxtune")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model, _ = load_weights(family, task, make_config(family, hf_config),
                                hf.open_checkpoint(folder, hf.read_config(folder)), shardings=plan.param_shardings,
                                ignore_mismatched_sizes=True, seed=recipe.train.seed)
    finally:
        quiet.setLevel(level)
    return model, apply_lora(recipe, model)


def _lora_run_state(recipe, task: str, hf_config: dict, plan, ckpt, step: int):
    """(model with adapters, its spec, its full params at checkpoint `step`) of a LoRA run."""
    model, spec = lora_run_model(recipe, task, hf_config, plan)
    trainable, frozen = lora.partition(spec, split_model(model)[1])
    shardings = lora.partition(spec, plan.param_shardings(model))[0]
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainable, shardings)
    return model, spec, lora.combine(ckpt.restore_params(step, target), frozen)


def _lora_run_params(recipe, task: str, hf_config: dict, plan, ckpt, step: int) -> dict:
    """The merged params of a LoRA run's checkpoint `step` (what its export holds)."""
    _, spec, params = _lora_run_state(recipe, task, hf_config, plan, ckpt, step)
    return lora.merged_params(spec, params)


# ---------------------------------------------------------------------------------------------
# eval


def _eval_recipe(path, loaded: Loaded, data: Optional[str], overrides: Sequence[str], batch_size, plan):
    """The recipe whose data `evaluate_path` reads: the run's, or `data` whole."""
    for o in overrides:
        if not o.split("=", 1)[0].startswith("data."):
            raise ConfigError(f"override '{o}': eval takes data.KEY=VALUE overrides only")
    raw = to_dict(loaded.recipe) if loaded.recipe is not None else {"model": {}, "data": {}, "train": {}}
    raw["task"] = loaded.task
    if not (loaded.recipe is not None and loaded.recipe.model.path is None and loaded.recipe.model.tokenizer):
        raw["model"]["path"] = loaded.tokenizer_dir  # (a model from model.config keeps its model.tokenizer)
    if data is not None:  # the whole file, its labels mapped onto the model's ids
        raw["data"].update(train=data, validation=None, test=None, validation_fraction=0.0,
                           test_fraction=0.0, deduplicate=False)
        if loaded.labels:
            raw["data"]["labels"] = loaded.labels
    raw = apply_overrides(raw, list(overrides))
    t = raw["train"]
    b = batch_size or t.get("eval_batch_size") or t.get("batch_size") or 32
    shards = plan.mesh.shape["data"] * plan.mesh.shape["fsdp"]
    t["batch_size"] = t["eval_batch_size"] = math.ceil(b / shards) * shards  # every device gets rows
    return from_dict(raw, f"<eval {path}>")


def evaluate_path(path, *, data: Optional[str] = None, split: Optional[str] = None,
                  overrides: Sequence[str] = (), step: Optional[int] = None,
                  batch_size: Optional[int] = None) -> tuple[str, int, dict, Loaded]:
    """Metrics of a run folder or model folder over a whole split.

    `data`: a data spec evaluated in full (its own file, not split); without it a run folder's
    recipe data is used (`split`, default test, else validation). `overrides`: `data.*=VALUE`
    (e.g. data.text_column=sentence). Returns (what was evaluated, examples, metrics, loaded).
    """
    plan = _plan()
    loaded = load(path, step=step, plan=plan)
    if loaded.recipe is None and data is None:
        raise JaxtuneError(f"{path} is a model folder: give the data to evaluate with --data SPEC")
    recipe = _eval_recipe(path, loaded, data, overrides, batch_size, plan)
    tokenizer, images, _ = load_preprocessing(recipe)
    d = build_data(recipe, tokenizer, images)
    if data is not None:
        split, what = "train", data
    else:
        split = split or ("test" if "test" in d.splits else "validation")
        if split not in d.splits:
            raise DataError(f"no '{split}' split in {path}'s data; available: {', '.join(d.splits)}")
        what = f"{split} split"
    if loaded.labels and d.label_names and list(d.label_names) != loaded.labels:
        raise DataError(f"the data's labels {d.label_names} differ from the model's {loaded.labels}")
    task = loaded.task_object()
    params = split_model(loaded.model)[1]
    sh = jax.tree.map(lambda x: x.sharding, params)
    eval_step = plan.jit_eval_step(make_eval_step(make_eval_fn(loaded.model, task)), sh)
    batches = (plan.shard_batch(x) for x in d.eval_batches(split))
    return what, d.num_examples[split], evaluate(eval_step, params, batches, task, split=what), loaded


# ---------------------------------------------------------------------------------------------
# export and predict


def export_run(run_dir, out_dir, *, step: Optional[int] = None, best: bool = True) -> Loaded:
    """An HF folder (weights, config with id2label, tokenizer files) from a run's checkpoint."""
    if not is_run_dir(run_dir):
        raise JaxtuneError(f"{run_dir} is not a run folder (config.yaml + model_config.json)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise JaxtuneError(f"{out} exists and is not empty; choose a new folder")
    loaded = load(run_dir, step=step, best=best)
    if loaded.step is None:
        raise JaxtuneError(f"{run_dir} has no checkpoint to export (its export/ folder is already one)")
    save_pretrained(loaded.model, out, tokenizer=preprocessing_of(loaded))
    return loaded


def preprocessing_of(loaded: Loaded):
    """What an export writes beside the weights: the model folder's tokenizer files; for a CTC
    model its vocabulary (the config's id2label, what the run trained with) and audio settings
    as a Wav2Vec2Processor reads them."""
    config = loaded.model.config
    if loaded.task == "ctc" and config.id2label and len(config.id2label) == config.vocab_size:
        settings = AudioSettings.from_model(hf.resolve_model_dir(loaded.tokenizer_dir)) if loaded.tokenizer_dir \
            else AudioSettings()
        return AudioProcessor(CharVocab(tuple(config.id2label)), settings)
    return loaded.tokenizer_dir


def export_peft(run_dir, out_dir, *, step: Optional[int] = None, best: bool = True) -> str:
    """A PEFT adapter folder (adapters + train_also as modules_to_save) from a LoRA run's
    checkpoint; returns what was exported, in words."""
    if not is_run_dir(run_dir):
        raise JaxtuneError(f"{run_dir} is not a run folder (config.yaml + model_config.json)")
    run, out = Path(run_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise JaxtuneError(f"{out} exists and is not empty; choose a new folder")
    recipe = load_recipe(run / CONFIG)
    if not is_lora_recipe(recipe):
        raise JaxtuneError(f"{run} is not a LoRA run (no lora section); --peft exports adapters")
    task, hf_config = read_model_config(run)
    ckpt = Checkpoints(run / CHECKPOINTS, recipe.checkpoint, metric=recipe.train.metric,
                       mode=recipe.train.metric_mode, read_only=True) if (run / CHECKPOINTS).is_dir() else None
    try:
        steps = ckpt.steps() if ckpt is not None else []
        if not steps:
            raise JaxtuneError(f"{run} has no checkpoint to export adapters from")
        chosen, why = _choose_step(run, ckpt, steps, step, best)
        model, _, params = _lora_run_state(recipe, task, hf_config, _plan(), ckpt, chosen)
    finally:
        if ckpt is not None:
            ckpt.close()
    lora.save_peft(model, out, params, base_model=recipe.model.path)
    return f"{run}, checkpoint step {chosen} ({why})"


def predict(loaded: Loaded, inputs: Sequence[str], **options) -> list[dict]:
    """The task's prediction for each input (texts, prompts or image paths); see `Task.predict`."""
    if not inputs:
        raise JaxtuneError("give at least one INPUT to predict")
    return loaded.task_object().predict(loaded, list(inputs), **options)


__all__ = ["Loaded", "evaluate_path", "export_peft", "export_run", "is_run_dir", "load", "predict"]
