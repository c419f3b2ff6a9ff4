"""What each remedy against forgetting buys: the `forgetting` recipe run plainly and with each remedy,
target test accuracy beside the retention measure, as a README table.

    python tools/forgetting_table.py prepare            # data/forgetting/*.jsonl (once, ~1 min)
    flock /tmp/jaxtune-measure.lock python tools/forgetting_table.py run [NAME ...]   # all variants
    python tools/forgetting_table.py table              # the markdown table from runs/forgetting/

`prepare` writes, from the quickstart's own splits (the same data layer, de-duplication and split
seed: tools/recipe_splits.py): a seeded sample of 2,000 of its training tweets, 500 of its
validation tweets, its whole test split (3,725), and 512 WordNet usage-example sentences as the
retention texts (tools/retention_text.py; Debian `wordnet-base`). `run` trains each variant of
VARIANTS in this process, one after another (`--restart`: a fresh run each time), and writes
runs/forgetting/table.json and table.md.

Each remedy's strength is a stated choice, not a tuned one (no time for a sweep per remedy):
L2-SP's decoupled decay is sized so the pull integrated over the run, sum_t lr_t * wd, is about 1
(at wd 0.1, as in quickstart_l2sp, it is 0.001: nothing happens in 189 steps); EWC's Fisher has
mean 1 over the penalised weights, so strength 1 pulls the weights the retention objective relies
on most (Fisher ~10-1000) harder than the task gradient, and 100 pulls nearly all of them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

import recipe_splits  # noqa: E402
import retention_text  # noqa: E402

DATA = Path("data/forgetting")
RUNS = Path("runs/forgetting")
SIZES = {"train": 2000, "validation": 500}  # test: the whole split
RETENTION_TEXTS = 512

# name -> (what it is, overrides of the `forgetting` recipe)
VARIANTS = {
    "plain": ("full fine-tune, weight decay 0.01 toward zero", []),
    "ewc1": ("EWC strength 1 (Fisher from 256 retention samples)",
             ["optim.ewc.strength=1", "optim.ewc.samples=256"]),
    "freeze": ("lower half frozen (embeddings, layers 0-2)",
               ["optim.freeze=['bert/embeddings/', 'bert/encoder/layer/[0-2]/']"]),
    "lora": ("LoRA rank 8 (alpha 16, lr 1e-3; classifier in full)",
             ["lora.rank=8", "lora.alpha=16", "optim.lr=1e-3"]),
    "llrd": ("layer-wise LR decay 0.85 (embeddings lr x 0.85^7)", ["optim.layerwise_lr_decay=0.85"]),
    "l2sp": ("L2-SP: decay toward the pretrained weights, wd 100",
             ["optim.decay_toward=pretrained", "optim.weight_decay=100"]),
    "ewc100": ("EWC strength 100", ["optim.ewc.strength=100", "optim.ewc.samples=256"]),
}


def prepare(seed: int = 0) -> None:
    from jaxtune.config import load_recipe
    from jaxtune.data.pipeline import prepare as prepare_splits

    recipe = load_recipe("quickstart")
    prepared = prepare_splits(recipe.data, recipe.task)
    DATA.mkdir(parents=True, exist_ok=True)
    for split, source in prepared.splits.items():
        rows = recipe_splits.split_rows(recipe, split, source, prepared.label_names)
        if split in SIZES:
            rows = random.Random(seed).sample(rows, SIZES[split])
        _write(DATA / f"{split}.jsonl", rows)
        print(f"{DATA / (split + '.jsonl')}: {len(rows)} of the quickstart's {len(source)} {split} examples")
    rows = retention_text.sample(RETENTION_TEXTS, seed)
    _write(DATA / "retention.jsonl", rows)
    print(f"{DATA / 'retention.jsonl'}: {len(rows)} WordNet usage examples")


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def run_variants(names: list[str]) -> None:
    from jaxtune.config import load_recipe
    from jaxtune.run import run

    for name in names:
        what, overrides = VARIANTS[name]
        print(f"=== {name}: {what}", flush=True)
        t0 = time.time()
        run(load_recipe("forgetting", overrides + [f"output_dir={RUNS / name}"]), restart=True)
        print(f"=== {name}: {time.time() - t0:.0f} s", flush=True)
    write_table()


def row(name: str) -> dict | None:
    path = RUNS / name / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    r = s["retention"]
    tested = r["model_step"] or r["last"]
    return {
        "variant": name, "what": VARIANTS[name][0], "best_step": s["best_step"], "steps": s["steps"],
        "test_accuracy": s["test"]["accuracy"], "test_macro_f1": s["test"]["macro_f1"],
        "rank_correlation": tested["rank_correlation"], "cosine_to_pretrained": tested["cosine_to_pretrained"],
        "last_rank_correlation": r["last"]["rank_correlation"], "wall_time_s": s["session"]["wall_time_s"],
    }


def write_table() -> str:
    rows = [r for r in (row(n) for n in VARIANTS) if r is not None]
    lines = ["| variant | test accuracy | macro-F1 | retention: rank corr. | cosine to pretrained | "
             "best step / steps | time |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} | "
                     f"{r['rank_correlation']:.4f} | {r['cosine_to_pretrained']:.4f} | "
                     f"{r['best_step']} / {r['steps']} | {r['wall_time_s']:.0f} s |")
    text = "\n".join(lines)
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / "table.json").write_text(json.dumps(rows, indent=2))
    (RUNS / "table.md").write_text(text + "\n")
    print(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    r = sub.add_parser("run")
    r.add_argument("names", nargs="*", help=f"variants (default: all of {', '.join(VARIANTS)})")
    sub.add_parser("table")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare()
    elif args.cmd == "run":
        unknown = [n for n in args.names if n not in VARIANTS]
        if unknown:
            ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        run_variants(args.names or list(VARIANTS))
    else:
        write_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
