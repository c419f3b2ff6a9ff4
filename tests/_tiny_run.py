"""A tiny but real run for the trainer tests: a random BERT with a word-level tokenizer, a CSV of
texts whose words carry the label, and a recipe that checkpoints often.

`make_assets(folder)` writes `bert/` (config.json, model.safetensors, tokenizer files), `data.csv`
and returns a function `recipe(out_dir, **changes) -> path of a recipe YAML`.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

WORDS = {
    "pos": ["good", "great", "nice", "happy", "love"],
    "neg": ["bad", "awful", "sad", "hate", "poor"],
    "neu": ["table", "green", "paper", "seven", "road"],
}
FILLER = ["the", "a", "is", "was", "it", "day", "movie", "food", "very", "quite"]


def make_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + sum(WORDS.values(), [])
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert len(tok) == len(vocab)
    tok.save_pretrained(str(folder))
    return tok


def make_bert(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, type_vocab_size=2,
                        initializer_range=0.3)  # wide: random features that tell words apart
    BertModel(config).save_pretrained(str(folder))
    return folder


def make_csv(path: Path, n: int = 120, seed: int = 0) -> Path:
    import random

    rnd = random.Random(seed)
    labels = list(WORDS)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = labels[i % 3]
            if rnd.random() < 0.15:  # some noise: the task is learnable, not trivial
                words = rnd.sample(WORDS[labels[(i + 1) % 3]], 2)
            else:
                words = rnd.sample(WORDS[label], 2)
            text = rnd.sample(FILLER, rnd.randint(1, 8)) + words
            rnd.shuffle(text)
            w.writerow([f"{i} " + " ".join(text), label])
    return path


BASE = {
    "task": "sequence-classification",
    "model": {"dropout": 0.1},
    "data": {"validation_fraction": 0.2, "test_fraction": 0.2, "max_length": 16},
    "optim": {"lr": 3e-3, "warmup": 2, "weight_decay": 0.01},
    "train": {"batch_size": 8, "steps": 24, "eval_every": 6, "log_every": 2, "seed": 0},
    "checkpoint": {"every": 2, "keep": 2, "keep_best": 1},
}


def make_assets(folder: Path):
    folder = Path(folder)
    bert = make_bert(folder / "bert")
    data = make_csv(folder / "data.csv")

    def recipe(out_dir, name="tiny", **changes) -> Path:
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
        raw["model"]["path"] = str(bert)
        raw["data"].update(train=f"csv:{data}", cache_dir=str(folder / "cache"))
        raw["output_dir"] = str(out_dir)
        for key, value in changes.items():
            section, _, leaf = key.partition("__")
            if leaf:
                raw.setdefault(section, {})[leaf] = value
            else:
                raw[section] = value
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return recipe


def cli(*args, env=None, timeout=240, **kw) -> subprocess.CompletedProcess:
    """`jaxtune ARGS` in a subprocess (8 fake CPU devices, inherited from the test session)."""
    return subprocess.run([sys.executable, "-m", "jaxtune.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, **kw)


def popen(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxtune.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def shared_tiny(tmp_path_factory):
    """(recipe, env, reference run folder): the tiny assets, a JAX compilation cache and one
    uninterrupted run, made once per test session and shared by test_checkpoint_damage,
    test_kill_resume and test_failures (copy the run before changing it). make_assets rewrites
    the same bytes each time, so every module's recipes name the same files."""
    root = tmp_path_factory.getbasetemp() / "tiny-shared"
    recipe = make_assets(root / "assets")
    env = {"JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    ref = root / "reference"
    if not (ref / "summary.json").is_file():
        shutil.rmtree(ref, ignore_errors=True)
        proc = cli("run", recipe(ref, name="reference"), env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, env, ref
