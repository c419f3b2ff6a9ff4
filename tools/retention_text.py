"""Write retention texts (`data.retention`) from WordNet 3.0, installed offline from Debian.

    apt-get install -y wordnet-base
    python tools/retention_text.py data/retention/wordnet.jsonl            # 512 sentences, seed 0
    python tools/retention_text.py OUT.jsonl --n 1000 --seed 1 --field gloss

Each line: {"text": ..., "gloss": ..., "lemma": ..., "pos": ...}. `text` is one of WordNet's usage
examples, the quoted sentences its lexicographers wrote to show a word in use ("The weather
improved toward evening"): real, edited, general English from every part of speech and domain, short
enough for any max_length, and nothing like the fine-tuning data of the bundled recipes (tweets),
which is what a retention set should be: a sample of what the pretrained model could read before.
`--field gloss` writes the definitions instead. A seeded sample of the examples that have at
least `--min-words` words, one per synset at most, in a stable order.

Why WordNet rather than `fortunes` or `dict-gcide` (both also Debian packages): fortunes are
jokes and quotations (many multi-line, some offensive), GCIDE is 1913 Webster's prose; WordNet's
examples are modern single sentences, which suits a sentence-embedding model's rank correlation
and a language model's perplexity alike.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
QUOTED = re.compile(r'"([^"]+)"')


def read_synsets(folder: Path = WORDNET):
    """(pos, first lemma, definition, [usage examples]) of every synset in WordNet's data files."""
    missing = [f for f in FILES.values() if not (folder / f).is_file()]
    if missing:
        raise SystemExit(f"error: {folder} has no {', '.join(missing)}; install them: apt-get install -y wordnet-base")
    for pos, name in FILES.items():
        for line in (folder / name).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:  # the license header
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            lemma = fields[4].replace("_", " ")
            examples = [q.strip() for q in QUOTED.findall(gloss)]
            # what is left once the examples are out: the definition, then "; " and "- Author" debris
            parts = [p.strip() for p in QUOTED.sub("", gloss).split(";")]
            definition = "; ".join(p for p in parts if p and not p.startswith("-"))
            yield pos, lemma, definition, examples


def sample(n: int, seed: int, field: str = "text", min_words: int = 4, folder: Path = WORDNET) -> list[dict]:
    rows = []
    for pos, lemma, definition, examples in read_synsets(folder):
        texts = examples if field == "text" else [definition]
        texts = [t for t in texts if len(t.split()) >= min_words]
        if texts:
            rows.append({"text": texts[0], "gloss": definition, "lemma": lemma, "pos": pos})
    if len(rows) < n:
        raise SystemExit(f"error: only {len(rows)} synsets have such a {field}; ask for fewer (--n)")
    picked = random.Random(seed).sample(rows, n)
    return sorted(picked, key=lambda r: (r["pos"], r["lemma"], r["text"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=512, help="how many texts (default 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--field", choices=("text", "gloss"), default="text",
                    help="text: usage example sentences (default); gloss: definitions")
    ap.add_argument("--min-words", type=int, default=4)
    ap.add_argument("--wordnet", type=Path, default=WORDNET, help=f"WordNet's dict folder (default {WORDNET})")
    args = ap.parse_args(argv)
    rows = sample(args.n, args.seed, args.field, args.min_words, args.wordnet)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({**r, "text": r["text"] if args.field == "text" else r["gloss"]}) + "\n")
    print(f"wrote {len(rows)} WordNet {'usage examples' if args.field == 'text' else 'glosses'} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
