"""English -> German translation pairs from the gettext message catalogs Debian packages install
(`/usr/share/locale/de/LC_MESSAGES/*.mo`: coreutils, git, apt, dpkg, PostgreSQL, GnuPG, GTK, ...),
for the translate_messages_de recipe, plus a subword tokenizer trained on the training pairs.

    python tools/translation_data.py       # -> data/translation_de/{train,validation,test}.tsv, tokenizer/

Pairs: every catalog's (msgid, msgstr) entry, read from the binary .mo files (each in the charset
its header names), except:
- the iso-codes catalogs (`iso_*`: names of languages, countries, subdivisions and currencies, most
  of them the same in both languages: a list of names, not translation);
- an entry's context (msgctxt) is dropped, and a plural entry gives its singular pair;
- whitespace runs (newlines, tabs, option-column padding) become one space, ends are stripped;
- entries without a letter, untranslated ones (target = source), and ones longer than
  `--max-chars` on either side (default 100) are left out;
- a source that several catalogs translate keeps the translation of the first catalog by file name.
Splits are by distinct source string, seeded: 1,000 test, 500 validation (`--test-size`,
`--validation-size`), the rest train.
Near-duplicates (the same message with other punctuation, or from a sibling catalog such as psql
and postgres) can sit on both sides of a split; exact duplicates cannot.

Tokenizer (`tokenizers` BPE over SentencePiece-style Metaspace pieces, one vocabulary for both
languages, trained on the training sources and targets, saved as a transformers fast tokenizer):
<pad> 0, </s> 1, <unk> 2; "</s>" is appended to every encoded text (as Marian's tokenizer does).
"""

from __future__ import annotations

import argparse
import random
import re
import struct
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pair_tsv import write_pairs

SPECIALS = ["<pad>", "</s>", "<unk>"]
MO_MAGIC = 0x950412DE


def read_mo(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) of a binary gettext catalog, decoded with the charset its header names.
    Context and plural forms are kept as gettext stores them (msgctxt\\x04msgid, forms joined by
    \\x00). The stdlib's gettext decodes the header as UTF-8 first and fails on Latin-1 ones."""
    data = path.read_bytes()
    if len(data) < 20:
        raise ValueError(f"{path}: not a gettext .mo file (only {len(data)} bytes)")
    order = "<" if struct.unpack("<I", data[:4])[0] == MO_MAGIC else ">"
    if struct.unpack(order + "I", data[:4])[0] != MO_MAGIC:
        raise ValueError(f"{path}: not a gettext .mo file (bad magic number)")
    n, ids_at, strs_at = struct.unpack(order + "3I", data[8:20])
    raw = []
    for i in range(n):
        id_len, id_off = struct.unpack(order + "2I", data[ids_at + 8 * i:ids_at + 8 * i + 8])
        str_len, str_off = struct.unpack(order + "2I", data[strs_at + 8 * i:strs_at + 8 * i + 8])
        raw.append((data[id_off:id_off + id_len], data[str_off:str_off + str_len]))
    header = dict(raw).get(b"", b"")
    charset = re.search(rb"charset=([-\w]+)", header)
    encoding = charset[1].decode("ascii") if charset else "utf-8"
    return [(k.decode(encoding, "replace"), v.decode(encoding, "replace")) for k, v in raw if k]


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def catalog_pairs(path: Path, max_chars: int) -> list[tuple[str, str]]:
    """The usable (English, German) pairs of one catalog (see the module docstring)."""
    out = []
    for msgid, msgstr in read_mo(path):
        source = normalise(msgid.split("\x04")[-1].split("\x00")[0])  # no context; the singular
        target = normalise(msgstr.split("\x00")[0])
        if (re.search(r"[^\W\d_]", source) and target and target != source
                and len(source) <= max_chars and len(target) <= max_chars):
            out.append((source, target))
    return out


def collect(locale_dir: Path, max_chars: int) -> dict[str, str]:
    files = sorted(f for f in locale_dir.glob("*.mo") if not f.name.startswith("iso_"))
    if not files:
        raise SystemExit(f"{locale_dir}: no .mo catalogs (install packages with German translations)")
    pairs: dict[str, str] = {}
    for f in files:
        for source, target in catalog_pairs(f, max_chars):
            pairs.setdefault(source, target)
    print(f"{locale_dir}: {len(files)} catalogs, {len(pairs)} distinct pairs")
    return pairs


def split_sources(sources: list[str], seed: int, held_out: dict[str, int]) -> dict[str, list[str]]:
    """`held_out` (split -> size) first, in a seeded order of the sorted sources; the rest is train."""
    order = sorted(sources)
    random.Random(seed).shuffle(order)
    if len(order) <= sum(held_out.values()):
        raise SystemExit(f"only {len(order)} pairs: too few for {held_out} held out and a training split")
    out, at = {}, 0
    for name, n in held_out.items():
        out[name] = order[at:at + n]
        at += n
    out["train"] = order[at:]
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


# Where the translate_messages_de recipe reads its data and the vocabulary its model is sized for.
OUT = "data/translation_de"
VOCAB_SIZE = 8000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locale-dir", default="/usr/share/locale/de/LC_MESSAGES")
    parser.add_argument("--out", default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument("--max-chars", type=int, default=100)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--validation-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = collect(Path(args.locale_dir), args.max_chars)
    splits = split_sources(list(pairs), args.seed, {"test": args.test_size, "validation": args.validation_size})
    for name, sources in splits.items():
        write_pairs(out / f"{name}.tsv", ((s, pairs[s]) for s in sources))
        print(f"{out / (name + '.tsv')}: {len(sources)} pairs")
    tokenizer = train_tokenizer([t for s in splits["train"] for t in (s, pairs[s])], args.vocab_size)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    print(f"{out / 'tokenizer'}: {len(tokenizer)} tokens")


if __name__ == "__main__":
    main()
