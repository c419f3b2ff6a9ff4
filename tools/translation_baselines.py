"""Baselines for the translate_messages_de recipe, scored on its test split with the same metrics
as the run's evaluation (`jaxtune.tasks.seq2seq_lm.sequence_scores`: sacrebleu BLEU and chrF, exact
match, word error rate).

    python tools/translation_baselines.py                 # data/translation_de (tools/translation_data.py)

- copy: the English source as the "translation" (what an untranslated program shows; message
  catalogs share placeholders, option names and product names, so it scores above zero);
- translation memory: the German translation of the most similar training source (cosine of
  TF-IDF vectors over character 2-4-grams, scikit-learn), what a translator's fuzzy-match tool
  proposes; strong here because catalogs repeat message patterns ("could not open file %s").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from jaxtune.tasks.seq2seq_lm import sequence_scores
from pair_tsv import read_split


def translation_memory(train_sources: list[str], train_targets: list[str], sources: list[str],
                       chunk: int = 500) -> list[str]:
    """The target of each source's nearest training source (TF-IDF char 2-4-grams, cosine)."""
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)
    memory = vectorizer.fit_transform(train_sources)
    out = []
    for i in range(0, len(sources), chunk):  # the similarity matrix one block of queries at a time
        sims = vectorizer.transform(sources[i:i + chunk]) @ memory.T
        out += [train_targets[j] for j in np.asarray(sims.argmax(axis=1)).ravel()]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/translation_de", help="tools/translation_data.py's folder")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    data = Path(args.data)
    train_sources, train_targets = read_split(data / "train.tsv")
    sources, refs = read_split(data / f"{args.split}.tsv")
    t0 = time.perf_counter()
    results = {
        "copy the English source": sequence_scores(sources, refs),
        "translation memory (nearest training source, TF-IDF char 2-4-grams)":
            sequence_scores(translation_memory(train_sources, train_targets, sources), refs),
    }
    print(f"{len(sources)} pairs of {data / (args.split + '.tsv')}, memory of {len(train_sources)} "
          f"training pairs ({time.perf_counter() - t0:.1f} s)")
    print("| baseline | BLEU | chrF | exact match |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['bleu']:.1f} | {r['chrf']:.1f} | {100 * r['exact_match']:.1f}% |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
