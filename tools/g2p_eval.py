"""Phoneme error rate and word accuracy of a jaxtune G2P model and of the g2p-en package's own
neural model, on the same held-out CMUdict words (the g2p_cmudict recipe's test split).

    python tools/g2p_eval.py runs/g2p_cmudict                 # a run folder (its export/) or a model folder
    python tools/g2p_eval.py runs/g2p_cmudict --num-beams 4

PER: jiwer's word error rate over the space-separated phonemes (stress digits count), over the
whole split (edits / reference phonemes); word accuracy: the share of words whose phonemes all
match their reference (the dictionary's first pronunciation).

g2p-en (PyPI g2p-en 2.1): its GRU encoder-decoder (`G2p.predict`, numpy, weights shipped in the
package) is called on each word directly, not through `G2p.__call__`, which would look words up
in CMUdict first and tag parts of speech with NLTK data that is not offline. Its import asks NLTK
to download that data; the download is skipped here. g2p-en's model was trained on CMUdict, very
likely including these words, so its numbers are on words it has seen; jaxtune's model never saw
them.
"""

from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

import jiwer
import nltk
import numpy as np
from transformers import AutoTokenizer

from jaxtune.models import from_pretrained
from jaxtune.models.seq2seq_generate import generate
from pair_tsv import read_split


def scores(hyps: list[str], refs: list[str]) -> dict:
    return {"per": float(jiwer.wer(refs, hyps)), "word_accuracy": float(np.mean([h == r for h, r in zip(hyps, refs)]))}


def jaxtune_predictions(model_dir: Path, sources: list[str], num_beams: int, batch: int) -> list[str]:
    model = from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for i in range(0, len(sources), batch):
        enc = tok(sources[i:i + batch], padding="max_length", max_length=32, truncation=True, return_tensors="np")
        gen = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=32, num_beams=num_beams)
        out += [tok.decode(gen.tokens[j, :gen.lengths[j]], skip_special_tokens=True).strip()
                for j in range(len(gen.lengths))]
    return out


def g2p_en_model():
    """g2p-en's G2p with its neural predictor, without NLTK data (see the module docstring)."""
    nltk.download = lambda *a, **k: False  # its import would fetch taggers/corpora from the network
    import g2p_en.g2p as g2p_module  # noqa: E402  (after the patch: the import itself downloads)

    g2p_module.cmudict = types.SimpleNamespace(dict=lambda: {})  # the lookup table is not used here
    return g2p_module.G2p()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a run folder (its export/ is read) or an HF model folder")
    parser.add_argument("--data", default="data/g2p/test.tsv")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    if (model_dir / "export").is_dir():
        model_dir = model_dir / "export"
    sources, refs = read_split(Path(args.data))
    words = [s.replace(" ", "") for s in sources]

    t0 = time.perf_counter()
    ours = jaxtune_predictions(model_dir, sources, args.num_beams, args.batch)
    t_ours = time.perf_counter() - t0
    g2p = g2p_en_model()
    t0 = time.perf_counter()
    theirs = [" ".join(g2p.predict(w)) for w in words]
    t_theirs = time.perf_counter() - t0

    results = {
        f"jaxtune T5 ({model_dir}, {'greedy' if args.num_beams == 1 else f'{args.num_beams} beams'})":
            {**scores(ours, refs), "seconds": round(t_ours, 1)},
        "g2p-en 2.1 neural model (G2p.predict; trained on CMUdict)": {**scores(theirs, refs), "seconds": round(t_theirs, 1)},
    }
    print(f"{len(words)} held-out words of {args.data}")
    print("| model | PER | word accuracy | seconds |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {100 * r['per']:.2f}% | {100 * r['word_accuracy']:.2f}% | {r['seconds']} |")
    print(json.dumps(results))
    for w, r, a, b in list(zip(words, refs, ours, theirs))[:8]:
        print(f"{w}: reference {r!r}; jaxtune {a!r}; g2p-en {b!r}")


if __name__ == "__main__":
    main()
