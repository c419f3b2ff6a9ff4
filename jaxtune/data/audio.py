"""Speech data: audio files + transcripts -> normalised waveforms and character labels (task ctc).

Sources (`data.train|validation|test`):

- `audio:DIR`: every WAV or FLAC file under DIR (sub-folders included, sorted by path) with its
  transcript in a `.txt` file of the same name beside it (`a/b.wav` + `a/b.txt`).
- `csv:` / `tsv:` / `jsonl:` tables with an audio path column (`data.audio_column`, default
  `audio`; relative paths are relative to the table's folder) and a transcript column
  (`data.text_column`, default `text`).

Each file is read once, when the data cache is built (`jaxtune.data.local`): decoded with
`soundfile`, mixed down to mono, resampled with `soxr` (VHQ) to the model's sampling rate, and
normalised as the model's feature extractor says (`do_normalize`: zero mean and unit variance per
recording, transformers' `Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm`), then stored as a
float32 Tensor feature of the TFDS array_record dataset (tfds' Audio feature needs TensorFlow).
The cache key holds the sampling rate, the normalisation, the vocabulary and the limits.

Transcripts: surrounding white space is stripped and inner runs of white space become one word
delimiter (`|`, as Wav2Vec2CTCTokenizer writes it); case is kept. The character vocabulary is the
model folder's `vocab.json` (a Wav2Vec2CTCTokenizer's) when it has one, else every character of
the training transcripts after `<pad>` (id 0, the CTC blank), `<unk>` and `|`, in sorted order.

Problems, each one line naming the file (and the table's line):
- an audio file that cannot be read or decoded, or holds no samples (or only silence, which
  cannot be normalised), an empty transcript, a transcript with characters outside the
  vocabulary, audio longer than `data.max_seconds`, a transcript longer than `data.max_length`
  characters: a `DataError`, or with `data.skip_bad_rows: true` the recording is dropped and
  counted in the data report by reason ("audio longer than 20 s", ...).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from jaxtune.data.readers import Table, read_table
from jaxtune.data.report import FileReport
from jaxtune.errors import DataError

AUDIO_SUFFIXES = (".wav", ".flac")
PAD, UNK, DELIMITER = "<pad>", "<unk>", "|"
IGNORE = -100  # label padding
NORMALIZE_EPS = 1e-7  # transformers' zero_mean_unit_var_norm
_SPACE = re.compile(r"\s+")


def soundfile():
    """The `soundfile` module (the `audio` extra), or a one-line error saying how to install it."""
    try:
        import soundfile as sf
    except ImportError as e:  # also when libsndfile itself is missing
        raise DataError(f"reading audio needs soundfile: pip install 'jaxtune[audio]' ({e})") from None
    return sf


def soxr():
    try:
        import soxr as resampler
    except ImportError as e:
        raise DataError(f"resampling audio needs soxr: pip install 'jaxtune[audio]' ({e})") from None
    return resampler


@dataclass(frozen=True)
class AudioSettings:
    """What the model's feature extractor expects (`preprocessor_config.json`)."""

    sampling_rate: int = 16000
    do_normalize: bool = True

    @classmethod
    def from_model(cls, folder) -> "AudioSettings":
        f = Path(folder) / "preprocessor_config.json" if folder else None
        if f is None or not f.is_file():
            return cls()
        cfg = json.loads(f.read_text())
        return cls(int(cfg.get("sampling_rate", 16000)), bool(cfg.get("do_normalize", True)))

    def preprocessor_config(self) -> dict:
        """transformers' Wav2Vec2FeatureExtractor config for these settings."""
        return {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
                "sampling_rate": self.sampling_rate, "padding_value": 0.0, "padding_side": "right",
                "do_normalize": self.do_normalize, "return_attention_mask": True}


def normalize_text(text: str) -> str:
    """Stripped, each run of white space one space."""
    return _SPACE.sub(" ", text).strip()


@dataclass(frozen=True)
class CharVocab:
    """A CTC character vocabulary: `tokens` in id order; the blank is `pad`, words are separated by
    `delimiter`."""

    tokens: tuple[str, ...]
    pad: str = PAD
    unk: str = UNK
    delimiter: str = DELIMITER

    def __post_init__(self):
        for what, tok in (("pad", self.pad), ("word delimiter", self.delimiter)):
            if tok not in self.tokens:
                raise DataError(f"the vocabulary has no {what} token {tok!r}")

    @classmethod
    def from_transcripts(cls, texts: Sequence[str]) -> "CharVocab":
        chars = sorted({c for t in texts for c in normalize_text(t) if c != " "} - {DELIMITER})
        return cls((PAD, UNK, DELIMITER, *chars))

    @classmethod
    def from_model(cls, folder) -> Optional["CharVocab"]:
        """The Wav2Vec2CTCTokenizer vocabulary (`vocab.json` + `tokenizer_config.json`) of a model
        folder; None when it has none."""
        f = Path(folder) / "vocab.json" if folder else None
        if f is None or not f.is_file():
            return None
        vocab = json.loads(f.read_text())
        if vocab and all(isinstance(v, dict) for v in vocab.values()):  # multilingual: {lang: vocab}
            raise DataError(f"{f}: a vocabulary per language (multilingual tokenizer) is not supported")
        ids = sorted(vocab.values())
        if ids != list(range(len(ids))):
            raise DataError(f"{f}: token ids are not 0..{len(ids) - 1}")
        tc = Path(folder) / "tokenizer_config.json"
        tcfg = json.loads(tc.read_text()) if tc.is_file() else {}
        tokens = tuple(sorted(vocab, key=vocab.get))
        return cls(tokens, pad=_token(tcfg.get("pad_token", PAD)), unk=_token(tcfg.get("unk_token", UNK)),
                   delimiter=_token(tcfg.get("word_delimiter_token", DELIMITER)))

    @property
    def blank_id(self) -> int:
        return self.tokens.index(self.pad)

    @property
    def delimiter_id(self) -> int:
        return self.tokens.index(self.delimiter)

    def unknown(self, text: str) -> list[str]:
        """The characters of `text` outside the vocabulary (in order of first use)."""
        index = self.index
        return list(dict.fromkeys(c for c in normalize_text(text) if c != " " and c not in index))

    @property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def encode(self, text: str) -> list[int]:
        index = self.index
        return [index[self.delimiter if c == " " else c] for c in normalize_text(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids (already CTC-collapsed) -> text: the delimiter becomes a space, pad and unk vanish."""
        out = []
        for i in ids:
            tok = self.tokens[int(i)]
            if tok in (self.pad, self.unk):
                continue
            out.append(" " if tok == self.delimiter else tok)
        return normalize_text("".join(out))

    def save_pretrained(self, out_dir, settings: AudioSettings = AudioSettings()) -> None:
        """Write what transformers' Wav2Vec2Processor loads: vocab.json, tokenizer_config.json,
        special_tokens_map.json and preprocessor_config.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vocab.json").write_text(json.dumps(self.index, ensure_ascii=False, indent=1))
        special = {"pad_token": self.pad, "unk_token": self.unk}
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "Wav2Vec2CTCTokenizer", "word_delimiter_token": self.delimiter,
            "do_lower_case": False, "bos_token": None, "eos_token": None, **special,
            "processor_class": "Wav2Vec2Processor"}, indent=1))
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
        (out / "preprocessor_config.json").write_text(
            json.dumps({**settings.preprocessor_config(), "processor_class": "Wav2Vec2Processor"}, indent=1))


def _token(t) -> str:
    return t["content"] if isinstance(t, dict) else str(t)


@dataclass(frozen=True)
class AudioFormat:
    """How a speech task reads its data (part of the schema, so of the data cache's key)."""

    settings: AudioSettings = AudioSettings()
    vocab: Optional[CharVocab] = None  # None: built from the training transcripts
    max_seconds: float = 20.0
    max_length: int = 128  # characters of a transcript (the label width of a batch)

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * self.settings.sampling_rate)


@dataclass
class AudioProcessor:
    """A run's speech preprocessing: what an export writes beside the weights (`save_pretrained`)."""

    vocab: CharVocab
    settings: AudioSettings

    def save_pretrained(self, out_dir) -> None:
        self.vocab.save_pretrained(out_dir, self.settings)


# ---------------------------------------------------------------------------------------------
# Reading


def zero_mean_unit_var(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean()) / np.sqrt(x.var() + NORMALIZE_EPS)).astype(np.float32)


def read_audio(path, settings: AudioSettings) -> np.ndarray:
    """One file as float32 mono at `settings.sampling_rate`, normalised when the settings say so.
    A file that cannot be read or decoded, or has no samples, is a DataError naming it."""
    sf = soundfile()
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise DataError(f"{path}: audio file not found") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # soundfile.LibsndfileError and others: not audio it can decode
        raise DataError(f"{path}: cannot decode audio ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if data.size == 0:
        raise DataError(f"{path}: the audio file holds no samples")
    x = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != settings.sampling_rate:
        x = soxr().resample(x, rate, settings.sampling_rate, quality="VHQ").astype(np.float32)
    if settings.do_normalize:
        if float(x.var()) == 0.0:
            raise DataError(f"{path}: the audio is constant (silence), nothing to normalise")
        x = zero_mean_unit_var(x)
    return np.ascontiguousarray(x, np.float32)


def _folder_rows(root: Path, table: Table) -> list[tuple[int, Path, Optional[str]]]:
    """(record number, audio file, transcript or None when its .txt is missing) under `root`."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in the folder")
    rows = []
    for n, f in enumerate(files, 1):
        txt = f.with_suffix(".txt")
        try:
            text = txt.read_text(encoding="utf-8") if txt.is_file() else None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {txt}: {getattr(e, 'strerror', None) or e}") from None
        rows.append((n, f, text))
    table.report.rows = len(rows)
    return rows


def _table_rows(spec, schema, cfg, split: str) -> tuple[Table, list[tuple[int, Path, Optional[str]]]]:
    """(the table's report, (line, audio path, transcript) per row) of a csv/tsv/jsonl spec."""
    table = read_table(spec, schema, cfg, split)
    base = spec.paths[0].parent
    rows = []
    for row, line in zip(table.rows, table.lines):
        p = Path(row["audio"]).expanduser()
        rows.append((line, p if p.is_absolute() else base / p, row["text"]))
    return Table(report=table.report), rows


def _bad(table: Table, cfg, where: str, reason: str, count_as: str) -> None:
    if not cfg.skip_bad_rows:
        raise DataError(f"{where}: {reason} (data.skip_bad_rows=true drops such recordings and counts them)")
    table.report.drop(count_as)


def read_audio_table(spec, schema, cfg, split: str) -> Table:
    """Decoded rows {'audio': float32 (S,), 'text': transcript} of one split, with their
    records/lines and audio hashes (for de-duplication). Vocabulary checks come later
    (`check_vocab`), once the vocabulary is known."""
    fmt: AudioFormat = schema.audio
    if spec.kind == "audio":
        table = Table(report=FileReport(file=str(spec.paths[0]), split=split))
        rows = _folder_rows(spec.paths[0], table)
        where_of = str  # the audio file itself
    else:
        table, rows = _table_rows(spec, schema, cfg, split)

        def where_of(p, line=None):
            return f"{spec.paths[0]} line {line} ({p})"
    limit = fmt.max_samples
    for line, path, text in rows:
        where = where_of(path) if spec.kind == "audio" else where_of(path, line)
        if text is None:
            _bad(table, cfg, where, f"no transcript ({path.with_suffix('.txt').name} is missing)", "no transcript")
            continue
        text = normalize_text(text)
        if not text:
            _bad(table, cfg, where, "the transcript is empty", "empty transcript")
            continue
        if len(text) > fmt.max_length:
            _bad(table, cfg, where, f"the transcript has {len(text)} characters, more than data.max_length "
                 f"({fmt.max_length})", f"transcript longer than {fmt.max_length} characters")
            continue
        try:
            audio = read_audio(path, fmt.settings)
        except DataError as e:
            reason = str(e)
            reason = reason[len(str(path)) + 2:] if reason.startswith(f"{path}: ") else reason
            _bad(table, cfg, where, reason, "unreadable or empty audio")
            continue
        if len(audio) > limit:
            seconds = len(audio) / fmt.settings.sampling_rate
            _bad(table, cfg, where, f"{seconds:.2f} s of audio, longer than data.max_seconds ({fmt.max_seconds:g})",
                 f"audio longer than {fmt.max_seconds:g} s")
            continue
        table.rows.append({"audio": audio, "text": text, "where": where})
        table.lines.append(line)
        table.keys.append(hashlib.sha1(audio.tobytes()).hexdigest())
    table.report.kept = len(table.rows)
    if not table.rows:
        what = "; ".join(f"{v} {k}" for k, v in table.report.dropped.items())
        raise DataError(f"{table.report.file}: no usable recordings" + (f" ({what})" if what else ""))
    return table


def check_vocab(tables: dict[str, Table], vocab: CharVocab, cfg) -> None:
    """Drop (data.skip_bad_rows) or refuse transcripts with characters outside `vocab`."""
    for t in tables.values():
        keep_rows, keep_lines, keep_keys = [], [], []
        for row, line, key in zip(t.rows, t.lines, t.keys):
            unknown = vocab.unknown(row["text"])
            if unknown:
                shown = ", ".join(repr(c) for c in unknown[:5])
                _bad(t, cfg, row["where"], f"the transcript has characters outside the vocabulary: {shown}",
                     "transcripts with characters outside the vocabulary")
                continue
            keep_rows.append(row)
            keep_lines.append(line)
            keep_keys.append(key)
        t.rows, t.lines, t.keys = keep_rows, keep_lines, keep_keys
        t.report.kept = len(t.rows)
        if not t.rows:
            raise DataError(f"{t.report.file}: no transcripts left inside the vocabulary")
    for t in tables.values():
        for row in t.rows:
            row.pop("where", None)


def read_audio_tables(specs: dict, schema, cfg) -> tuple[dict[str, Table], list[str]]:
    """Every split read and checked; returns (tables, vocabulary tokens in id order)."""
    tables = {split: read_audio_table(spec, schema, cfg, split) for split, spec in specs.items()}
    vocab = schema.audio.vocab or CharVocab.from_transcripts([r["text"] for r in tables["train"].rows])
    check_vocab(tables, vocab, cfg)
    return tables, list(vocab.tokens)


# ---------------------------------------------------------------------------------------------
# Batches


def audio_buckets(max_samples: int, shortest: int = 8000, ratio: float = 1.25) -> tuple[int, ...]:
    """Padded lengths a batch can have: `shortest` samples, then x1.25 each, up to `max_samples`,
    so padding wastes at most a fifth of a batch and few shapes compile.

    >>> audio_buckets(16000)
    (8000, 10000, 12500, 15625, 16000)
    """
    out, b = [], min(shortest, max_samples)
    while b < max_samples:
        out.append(b)
        b = int(math.ceil(b * ratio))
    return tuple(out) + (max_samples,)


class AudioEncoder:
    """Stored examples -> `input_values` (b, L) float32 zero-padded, `attention_mask` (b, L) int32
    and `labels` (b, max_length) int32 (IGNORE after each transcript); L is the smallest bucket
    holding the longest recording of the global batch. Picklable."""

    def __init__(self, vocab: CharVocab, max_length: int, buckets: Sequence[int]):
        self.vocab, self.max_length, self.buckets = vocab, max_length, tuple(buckets)

    def encode(self, examples: Sequence[dict]) -> list[tuple[np.ndarray, list[int]]]:
        return [(np.asarray(e["audio"], np.float32), self.vocab.encode(e["text"])) for e in examples]

    def bucket(self, encoded) -> int:
        longest = max(len(a) for a, _ in encoded)
        for b in self.buckets:
            if b >= longest:
                return b
        raise DataError(f"a recording of {longest} samples is longer than the longest bucket ({self.buckets[-1]})")

    def collate(self, encoded, examples, length: int) -> dict[str, np.ndarray]:
        n = len(encoded)
        values = np.zeros((n, length), np.float32)
        mask = np.zeros((n, length), np.int32)
        labels = np.full((n, self.max_length), IGNORE, np.int32)
        for i, (audio, ids) in enumerate(encoded):
            values[i, :len(audio)], mask[i, :len(audio)] = audio, 1
            labels[i, :len(ids)] = ids
        return {"input_values": values, "attention_mask": mask, "labels": labels}


__all__ = ["AUDIO_SUFFIXES", "AudioEncoder", "AudioFormat", "AudioProcessor", "AudioSettings", "CharVocab",
           "IGNORE", "audio_buckets", "normalize_text", "read_audio", "read_audio_tables", "zero_mean_unit_var"]
