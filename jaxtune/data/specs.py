"""Data specs: the strings a recipe gives in `data.train|validation|test`.

    tfds:NAME[/CONFIG][:SPLIT]     a TFDS dataset read with tfds.data_source (array_record)
    csv:PATH  tsv:PATH  jsonl:PATH  a local table (header row / one JSON object per line)
    images:DIR                     one subfolder per class, image files inside
    idx:IMAGES[,LABELS]            MNIST-format IDX files, gzip or not
    audio:DIR                      WAV/FLAC files, each with its transcript in a .txt beside it

PATH may be `pkg:PACKAGE/path` (a file inside an installed package). A bare path is read by its
suffix (.csv, .tsv, .jsonl) or, for a folder, as `images:`.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from jaxtune.errors import DataError, JaxtuneError
from jaxtune.paths import resolve_path

KINDS = ("tfds", "csv", "tsv", "jsonl", "images", "idx", "audio")
LOCAL_KINDS = KINDS[1:]
_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class Spec:
    kind: str  # one of KINDS
    text: str  # as written in the recipe
    name: str = ""  # tfds: NAME or NAME/CONFIG
    split: Optional[str] = None  # tfds: split (None: the role's default)
    paths: tuple[Path, ...] = ()  # local: resolved files or folder

    @property
    def is_local(self) -> bool:
        return self.kind != "tfds"


def _resolve(path: str, role: str, text: str) -> Path:
    try:
        p = resolve_path(path.strip())
    except JaxtuneError as e:
        raise DataError(f"data.{role} '{text}': {e}") from None
    return p


def _idx_labels_for(images: Path) -> Path:
    """MNIST naming: train-images-idx3-ubyte[.gz] -> train-labels-idx1-ubyte[.gz]."""
    name = images.name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    return images.with_name(name)


def parse_spec(text: str, role: str = "train") -> Spec:
    """Parse one data spec and check that its files exist.

    >>> parse_spec('tfds:glue/sst2:validation', 'validation')
    Spec(kind='tfds', text='tfds:glue/sst2:validation', name='glue/sst2', split='validation', paths=())
    """
    try:
        return _parse_spec(text, role)
    except OSError as e:  # a folder on the way that we may not enter
        raise DataError(f"data.{role}: cannot read {e.filename or text}: {e.strerror or e}") from None


def _parse_spec(text: str, role: str) -> Spec:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"data.{role}: empty data spec")
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS:
        # A bare path: infer the kind from the file.
        p = _resolve(text, role, text)
        if p.is_dir():
            kind, rest = "images", text
        elif p.suffix.lower() in _SUFFIX:
            kind, rest = _SUFFIX[p.suffix.lower()], text
        elif sep and re.fullmatch(r"[a-z]+", kind) and kind != "pkg":
            raise DataError(
                f"data.{role}: unknown data spec '{text}'; expected one of "
                + ", ".join(f"{k}:" for k in KINDS)
            )
        elif not p.exists():
            raise DataError(f"data.{role}: file not found: {p}")
        else:
            raise DataError(
                f"data.{role}: cannot tell the format of '{text}'; write csv:, tsv:, jsonl:, "
                "images: or idx: before the path"
            )
    if kind == "tfds":
        name, _, split = rest.partition(":")
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z0-9_]+(/[A-Za-z0-9_.\-]+)?(:[0-9.]+)?", name):
            raise DataError(f"data.{role}: bad TFDS name in '{text}'; expected tfds:NAME[/CONFIG][:SPLIT]")
        return Spec("tfds", text, name=name, split=split.strip() or None)
    if kind == "idx":
        parts = [s for s in rest.split(",") if s.strip()]
        if not 1 <= len(parts) <= 2:
            raise DataError(f"data.{role}: expected idx:IMAGES[,LABELS], got '{text}'")
        images = _resolve(parts[0], role, text)
        labels = _resolve(parts[1], role, text) if len(parts) == 2 else _idx_labels_for(images)
        if labels == images:
            raise DataError(
                f"data.{role}: cannot guess the labels file for {images}; write idx:IMAGES,LABELS"
            )
        paths = (images, labels)
    else:
        paths = (_resolve(rest, role, text),)
    for p in paths:
        if kind == "images":
            if not p.exists():
                raise DataError(f"data.{role}: folder not found: {p}")
            if not p.is_dir():
                raise DataError(f"data.{role}: images: needs a folder with one subfolder per class, got file {p}")
        elif kind == "audio":
            if not p.is_dir():
                what = "folder not found" if not p.exists() else "audio: needs a folder of audio files, got file"
                raise DataError(f"data.{role}: {what} {p}")
        elif not p.exists():
            raise DataError(f"data.{role}: file not found: {p}")
        elif p.is_dir():
            raise DataError(f"data.{role}: expected a file, got folder {p}")
        elif not p.is_file():  # reading a FIFO waits for a writer; /dev/zero never ends
            raise DataError(f"data.{role}: {p} is not a regular file ({_file_kind(p)}); give a saved file")
    return Spec(kind, text, paths=paths)


def _file_kind(p: Path) -> str:
    mode = p.stat().st_mode
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"
