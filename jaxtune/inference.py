"""Using a trained model: `jaxtune eval`, `jaxtune export` and `jaxtune predict`.

    loaded = load("runs/quickstart")               # a run folder: its best checkpoint
    loaded = load("runs/quickstart", step=200)     # ... or a given step
    loaded = load("runs/quickstart/export")        # an HF folder (config.json + weights)
    metrics = evaluate_path("runs/quickstart", split="test")
    export_run("runs/quickstart", "out/", step=None)           # best (else latest) checkpoint
    predict(load("runs/quickstart/export"), ["great day!"])     # per input: label + probabilities
    predict(load("runs/lm"), ["3 plus 4 is"], max_new_tokens=20)  # causal-lm: generated text

A run folder is recognised by `config.yaml` + `model_config.json` (written by `jaxtune run`); its
weights come from `checkpoints/` (params only are read), or from `export/` when no checkpoint is
left. Labels: evaluation data is mapped onto the model's own `id2label`, so ids always agree.

`PREDICTORS` maps a task to `fn(loaded, inputs, **options) -> list of dicts` (one per input) and
`FORMATTERS` to `fn(result) -> str` (one console line); a task adds itself there. Causal-LM models
generate (`predict_generate`: greedy, or sampled with temperature / top-k / top-p and a seed);
token classifiers tag each whitespace-separated word (`predict_tokens`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from jaxtune.errors import ConfigError, DataError, JaxtuneError

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


def is_run_dir(path) -> bool:
    from jaxtune.trainer import MODEL_CONFIG

    p = Path(path)
    return (p / "config.yaml").is_file() and (p / MODEL_CONFIG).is_file()


def _plan():
    """All local devices on the data axis: inference never needs more."""
    from jaxtune.parallel import Plan

    return Plan.from_config(None)


def _folder_task(folder) -> str:
    from jaxtune.models import get_family, hf

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
    from jaxtune.models import from_pretrained

    p = Path(path)
    plan = plan or _plan()
    if is_run_dir(p):
        return _load_run(p, step=step, best=best, plan=plan)
    if step is not None:
        raise JaxtuneError(f"{p} is not a run folder (config.yaml + model_config.json); --step needs one")
    if not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else "is neither a run folder (config.yaml + checkpoints/) nor a model folder (config.json)"
        raise JaxtuneError(f"{p} {what}")
    task = _folder_task(p)
    model = from_pretrained(p, task, shardings=plan.param_shardings)
    return Loaded(model, task, str(p), str(p))


def _load_run(run: Path, *, step: Optional[int], best: bool, plan) -> Loaded:
    from jaxtune.checkpoint import CheckpointDamaged, Checkpoints
    from jaxtune.config import load_recipe
    from jaxtune.models import get_family, merge, split
    from jaxtune.models.trees import abstract_model
    from jaxtune.models.pretrained import make_config
    from jaxtune.trainer import MODEL_CONFIG

    recipe = load_recipe(run / "config.yaml")
    hf_config = json.loads((run / MODEL_CONFIG).read_text())
    task = hf_config.pop("jaxtune_task")
    ckpt_dir = run / "checkpoints"
    steps = []
    if ckpt_dir.is_dir():
        ckpt = Checkpoints(ckpt_dir, recipe.checkpoint, metric=recipe.train.metric,
                           mode=recipe.train.metric_mode, read_only=True)
        steps = ckpt.steps()
    if not steps:
        if step is None and (run / "export" / "config.json").is_file():
            loaded = load(run / "export", plan=plan)
            loaded.recipe, loaded.source = recipe, f"{run / 'export'} (no checkpoint left in {run})"
            return loaded
        raise JaxtuneError(f"{run} has no checkpoint" + (" and no export/" if step is None else ""))
    if step is None:
        chosen = (ckpt.best_step() if best else None) or max(steps)
        why = "best" if best and chosen == ckpt.best_step() else "latest"
    else:
        if step not in steps:
            raise JaxtuneError(f"{run} has no checkpoint at step {step}; available: {', '.join(map(str, steps))}")
        chosen, why = step, "requested"
    family = get_family(hf_config.get("model_type"))
    abstract = abstract_model(family.head(task), make_config(family, hf_config))
    graphdef, abs_params, rest = split(abstract)
    shardings = plan.param_shardings(abstract)
    import jax

    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_params, shardings)
    try:
        params = ckpt.restore_params(chosen, target)
    except CheckpointDamaged as e:  # read-only here: say which others exist, move nothing
        others = [s for s in steps if s != chosen]
        raise CheckpointDamaged(f"{e}; other checkpoints: {', '.join(map(str, others))} (--step N)"
                                if others else f"{e}; it is the only checkpoint of {run}", e.step) from None
    finally:
        ckpt.close()
    model = merge(graphdef, params, rest)
    return Loaded(model, task, f"{run}, checkpoint step {chosen} ({why})", recipe.model.path,
                  recipe=recipe, step=chosen)


# ---------------------------------------------------------------------------------------------
# eval


def evaluate_path(path, *, data: Optional[str] = None, split: Optional[str] = None,
                  overrides: Sequence[str] = (), step: Optional[int] = None,
                  batch_size: Optional[int] = None) -> tuple[str, int, dict, Loaded]:
    """Metrics of a run folder or model folder over a whole split.

    `data`: a data spec evaluated in full (its own file, not split); without it a run folder's
    recipe data is used (`split`, default test, else validation). `overrides`: `data.*=VALUE`
    (e.g. data.text_column=sentence). Returns (what was evaluated, examples, metrics, loaded).
    """
    import jax

    from jaxtune.config import apply_overrides, from_dict, to_dict
    from jaxtune.models import split as split_model
    from jaxtune.tasks import evaluate, get_task, make_eval_fn
    from jaxtune.train import make_eval_step
    from jaxtune.trainer import build_data, load_tokenizer_or_images

    plan = _plan()
    loaded = load(path, step=step, plan=plan)
    if loaded.recipe is None and data is None:
        raise JaxtuneError(f"{path} is a model folder: give the data to evaluate with --data SPEC")
    for o in overrides:
        if not o.split("=", 1)[0].startswith("data."):
            raise ConfigError(f"override '{o}': eval takes data.KEY=VALUE overrides only")
    raw = to_dict(loaded.recipe) if loaded.recipe is not None else {"model": {}, "data": {}, "train": {}}
    raw["task"] = loaded.task
    raw["model"]["path"] = loaded.tokenizer_dir
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
    recipe = from_dict(raw, f"<eval {path}>")
    tokenizer, images, _ = load_tokenizer_or_images(recipe)
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
    task = get_task(loaded.task, loaded.model.config)
    params = split_model(loaded.model)[1]
    sh = jax.tree.map(lambda x: x.sharding, params)
    eval_step = plan.jit_eval_step(make_eval_step(make_eval_fn(loaded.model, task)), sh)
    batches = (plan.shard_batch(x) for x in d.eval_batches(split))
    metrics = evaluate(eval_step, params, batches, task)
    return what, d.num_examples[split], metrics, loaded


# ---------------------------------------------------------------------------------------------
# export


def export_run(run_dir, out_dir, *, step: Optional[int] = None, best: bool = True) -> Loaded:
    """An HF folder (weights, config with id2label, tokenizer files) from a run's checkpoint."""
    from jaxtune.models import save_pretrained

    if not is_run_dir(run_dir):
        raise JaxtuneError(f"{run_dir} is not a run folder (config.yaml + model_config.json)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise JaxtuneError(f"{out} exists and is not empty; choose a new folder")
    loaded = load(run_dir, step=step, best=best)
    if loaded.step is None:
        raise JaxtuneError(f"{run_dir} has no checkpoint to export (its export/ folder is already one)")
    save_pretrained(loaded.model, out, tokenizer=loaded.tokenizer_dir)
    return loaded


# ---------------------------------------------------------------------------------------------
# predict


def _forward(loaded: Loaded):
    """A jitted `batch -> logits` for the loaded model (one compile per input shape)."""
    import jax

    from jaxtune.models import merge, split
    from jaxtune.tasks import model_inputs

    graphdef, params, rest = split(loaded.model)

    @jax.jit
    def logits(params, batch):
        return merge(graphdef, params, rest)(**model_inputs(batch), deterministic=True).logits

    return lambda batch: np.asarray(logits(params, batch), np.float64)


def _scores(loaded: Loaded, logits_BK: np.ndarray) -> list[dict]:
    """Per example: label and probabilities (single-label), labels over 0.5 (multi-label) or value."""
    config = loaded.model.config
    names = [str(n) for n in (config.id2label or [f"LABEL_{i}" for i in range(logits_BK.shape[-1])])]
    kind = config.problem_type or ("regression" if config.num_labels == 1 else "single_label_classification")
    out = []
    for row in logits_BK:
        if kind == "regression":
            out.append({"value": float(row[0]) if row.shape[-1] == 1 else row.tolist()})
        elif kind == "multi_label_classification":
            p = 1 / (1 + np.exp(-row))
            out.append({"labels": [n for n, q in zip(names, p) if q > 0.5],
                        "probabilities": dict(sorted(zip(names, p.tolist()), key=lambda t: -t[1]))})
        else:
            z = np.exp(row - row.max())
            p = z / z.sum()
            order = np.argsort(-p)
            out.append({"label": names[order[0]], "probabilities": {names[i]: float(p[i]) for i in order}})
    return out


def predict_texts(loaded: Loaded, texts: Sequence[str], *, max_length: int = 512, batch: int = 32) -> list[dict]:
    """Sequence classification of raw texts with the model folder's tokenizer."""
    from jaxtune.data import load_tokenizer

    if not loaded.tokenizer_dir:
        raise DataError(f"{loaded.source} has no tokenizer to read texts with")
    tok = load_tokenizer(loaded.tokenizer_dir)
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or max_length
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in tok.model_input_names]
    forward = _forward(loaded)
    results = []
    for i in range(0, len(texts), batch):
        chunk = list(texts[i:i + batch])
        enc = tok(chunk, truncation=True, max_length=min(max_length, limit), padding="longest", return_tensors="np")
        logits = forward({k: np.asarray(enc[k], np.int32) for k in keys if k in enc})
        results += [{"input": t, **s} for t, s in zip(chunk, _scores(loaded, logits))]
    return results


def predict_images(loaded: Loaded, paths: Sequence[str], *, batch: int = 32) -> list[dict]:
    """Image classification of image files, preprocessed like the model's evaluation."""
    from jaxtune.data.image import ImageEncoder, ImageSettings, image_settings_from_model

    config = loaded.model.config
    settings = image_settings_from_model(loaded.tokenizer_dir) if loaded.tokenizer_dir else None
    settings = ImageSettings.from_any(settings)
    if settings.size is None and getattr(config, "image_size", None):
        settings = settings.with_size(config.image_size)
    encoder = ImageEncoder(settings, getattr(config, "num_channels", 3))
    forward = _forward(loaded)
    results = []
    for i in range(0, len(paths), batch):
        chunk = list(paths[i:i + batch])
        images = []
        for p in chunk:
            try:
                images.append({"image": Path(p).read_bytes()})
            except OSError as e:
                raise DataError(f"cannot read image {p}: {e.strerror}") from None
        pixels = encoder(images, where=chunk)
        results += [{"input": p, **s} for p, s in zip(chunk, _scores(loaded, forward({"pixel_values": pixels})))]
    return results


def _tokenizer(loaded: Loaded):
    from jaxtune.data import load_tokenizer

    if not loaded.tokenizer_dir:
        raise DataError(f"{loaded.source} has no tokenizer to read texts with")
    return load_tokenizer(loaded.tokenizer_dir)


def predict_tokens(loaded: Loaded, texts: Sequence[str], *, batch: int = 32) -> list[dict]:
    """Token classification: each text is split on whitespace into words (as a CoNLL-style
    training file lists them), and each word gets the tag of its first sub-token, as in training.
    Words past the model's length limit get tag None."""
    tok = _tokenizer(loaded)
    config = loaded.model.config
    names = [str(n) for n in (config.id2label or [f"LABEL_{i}" for i in range(config.num_labels)])]
    limit = getattr(config, "max_position_embeddings", None) or 512
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in tok.model_input_names]
    forward = _forward(loaded)
    results = []
    for i in range(0, len(texts), batch):
        chunk = list(texts[i:i + batch])
        words = [t.split() or [t] for t in chunk]  # an empty text is one empty word
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=limit, padding="longest",
                  return_tensors="np")
        logits = forward({k: np.asarray(enc[k], np.int32) for k in keys if k in enc})
        for j, (text, ws) in enumerate(zip(chunk, words)):
            z = np.exp(logits[j] - logits[j].max(-1, keepdims=True))
            p_TK = z / z.sum(-1, keepdims=True)
            tags, scores, seen = [None] * len(ws), [None] * len(ws), set()
            for t, w in enumerate(enc.word_ids(j)):
                if w is not None and w not in seen:  # the word's first sub-token
                    seen.add(w)
                    k = int(p_TK[t].argmax())
                    tags[w], scores[w] = names[k], float(p_TK[t, k])
            results.append({"input": text, "words": ws, "tags": tags, "scores": scores})
    return results


def format_tags(r: dict) -> str:
    """'John/B-PER lives/O in/O Paris/B-LOC' (a word past the length limit: word/?)"""
    return " ".join(f"{w}/{t if t is not None else '?'}" for w, t in zip(r["words"], r["tags"]))


DEFAULT_NEW_TOKENS = 50


def predict_generate(loaded: Loaded, prompts: Sequence[str], *, max_new_tokens: Optional[int] = None,
                     do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0) -> list[dict]:
    """Causal-LM generation after each prompt (all in one batch), with the KV cache.

    A prompt is tokenized as training tokenized prompts (with the tokenizer's special tokens, e.g.
    a BOS it adds); an empty prompt starts from the BOS token. Greedy unless `do_sample`.
    `max_new_tokens` None: up to 50, fewer when the model's positions run out.
    Returns per prompt: input, generated (decoded new text, special tokens skipped), tokens (new
    token ids, EOS included) and stopped ('eos' or 'length').
    """
    from jaxtune.models.generate import generate

    tok = _tokenizer(loaded)
    config = loaded.model.config
    bos = tok.bos_token_id if tok.bos_token_id is not None else getattr(config, "bos_token_id", None)
    encoded = []
    for p in prompts:
        ids = list(tok(p)["input_ids"])
        if not ids:
            if bos is None:
                raise DataError("an empty prompt needs a BOS token, and neither the tokenizer nor the model has one")
            ids = [int(bos)]
        encoded.append(ids)
    longest = max(len(e) for e in encoded)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and longest >= limit:
        raise DataError(f"the longest prompt has {longest} tokens; the model has {limit} positions")
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_NEW_TOKENS if limit is None else min(DEFAULT_NEW_TOKENS, limit - longest)
    ids = np.zeros((len(encoded), longest), np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encoded):  # left-padded, as generate() wants
        ids[i, longest - len(e):], mask[i, longest - len(e):] = e, 1
    out = generate(loaded.model, ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    results = []
    for i, p in enumerate(prompts):
        new = [int(t) for t in out.tokens[i, : out.lengths[i]]]
        stopped = "eos" if _ends_with_eos(new, config) else "length"
        results.append({"input": p, "generated": tok.decode(new, skip_special_tokens=True), "tokens": new,
                        "stopped": stopped})
    return results


def _ends_with_eos(tokens: list[int], config) -> bool:
    eos = getattr(config, "eos_token_ids", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return bool(tokens) and tokens[-1] in eos


def format_generation(r: dict) -> str:
    """'"3 plus 4 is" -> " seven"' (both JSON-quoted: spaces and newlines stay visible)."""
    return f"{json.dumps(r['input'], ensure_ascii=False)} -> {json.dumps(r['generated'], ensure_ascii=False)}"


def format_scores(r: dict, top: int = 3) -> str:
    """'positive 0.912 (neutral 0.061, negative 0.027)  <- input'"""
    if "label" in r:
        probs = list(r["probabilities"].items())
        rest = ", ".join(f"{n} {p:.3f}" for n, p in probs[1:top])
        head = f"{probs[0][0]} {probs[0][1]:.3f}" + (f" ({rest})" if rest else "")
    elif "labels" in r:
        head = "[" + ", ".join(r["labels"]) + "]"
    else:
        head = f"{r['value']}"
    return f"{head}  <- {r['input']}"


# task -> predictor / line formatter; add a task by adding entries.
PREDICTORS: dict[str, Callable[..., list[dict]]] = {
    "sequence-classification": predict_texts,
    "image-classification": predict_images,
    "token-classification": predict_tokens,
    "causal-lm": predict_generate,
}
FORMATTERS: dict[str, Callable[[dict], str]] = {
    "sequence-classification": format_scores,
    "image-classification": format_scores,
    "token-classification": format_tags,
    "causal-lm": format_generation,
}


def predict(loaded: Loaded, inputs: Sequence[str], **kwargs) -> list[dict]:
    if not inputs:
        raise JaxtuneError("give at least one INPUT to predict")
    fn = PREDICTORS.get(loaded.task)
    if fn is None:
        raise JaxtuneError(f"predict does not support {loaded.task} models yet; supported: {', '.join(PREDICTORS)}")
    return fn(loaded, inputs, **kwargs)


__all__ = ["FORMATTERS", "Loaded", "PREDICTORS", "evaluate_path", "export_run", "format_generation",
           "format_scores", "format_tags", "is_run_dir", "load", "predict", "predict_generate",
           "predict_images", "predict_texts", "predict_tokens"]
