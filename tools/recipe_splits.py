"""Write the splits a recipe trains and tests on to JSONL files, so another recipe can use the
very same examples (the same held-out test set, nothing of it in train).

    python tools/recipe_splits.py quickstart data/tweets        # -> data/tweets/{train,validation,test}.jsonl

Each line is one example with the recipe's text column(s) and, when the recipe has labels, its
label column holding the label's name (`{"text": "...", "sentiment": "negative"}`). The splits are
exactly those `jaxtune run RECIPE` builds (de-duplication, held-out fractions, split seed), read
through the same data layer, in a stable order (sorted by text). Existing files are not
overwritten unless `--force`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxtune.config import find_recipe, load_recipe
from jaxtune.data.pipeline import prepare
from jaxtune.errors import JaxtuneError

# canonical example key -> the recipe's data field naming its column
COLUMNS = {"text": "text_column", "text_pair": "text_pair_column", "label": "label_column",
           "prompt": "prompt_column", "response": "response_column"}


def split_rows(recipe, split: str, source, label_names) -> list[dict]:
    data = recipe.data
    rows = []
    for i in range(len(source)):
        example = source[i]
        row = {}
        for key, field in COLUMNS.items():
            if key in example and getattr(data, field, None):
                value = example[key]
                if key == "label" and label_names is not None:
                    value = label_names[int(value)]
                row[getattr(data, field)] = value
        rows.append(row)
    text_key = data.text_column if data.text_column in (rows[0] if rows else {}) else None
    return sorted(rows, key=lambda r: json.dumps(r[text_key] if text_key else r, sort_keys=True))


def write_splits(recipe_name: str, out: Path, overrides=(), force: bool = False) -> dict[str, int]:
    recipe = load_recipe(find_recipe(recipe_name), overrides)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(recipe.data, recipe.task)
    targets = {split: out / f"{split}.jsonl" for split in prepared.splits}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        raise JaxtuneError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")
    counts = {}
    for split, source in prepared.splits.items():
        rows = split_rows(recipe, split, source, prepared.label_names)
        tmp = targets[split].with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(targets[split])
        counts[split] = len(rows)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a bundled recipe name or a recipe file")
    p.add_argument("out", type=Path, help="folder for train.jsonl, validation.jsonl, test.jsonl")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, as for jaxtune run")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    args = p.parse_args(argv)
    try:
        counts = write_splits(args.recipe, args.out, args.overrides, args.force)
    except JaxtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, n in counts.items():
        print(f"{args.out / (split + '.jsonl')}: {n} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
