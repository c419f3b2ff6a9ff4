"""Read local files (csv, tsv, jsonl, image folders, IDX) into canonical rows.

Policy for problems:
- A file that cannot be used at all (missing, unreadable, empty, a required column absent, not
  IDX) raises `DataError` with one line naming the file (and the columns found, or the OS reason).
- A row that cannot be parsed (wrong number of CSV fields, invalid JSON, undecodable bytes or
  image, tokens and tags of different lengths) raises `DataError` naming the file and line, unless
  `data.skip_bad_rows` is set: then it is dropped and counted in the report.
- CSV and TSV quotes are read as pandas and Python's csv module read them by default
  (`data.quoting: minimal`: a quoted field may hold delimiters, line breaks and "" for a quote);
  `data.quoting: none` reads quotes as plain text, for files with bare quotes.
- Causal-lm rows are built here: prompt/response templates are filled and conversations (and,
  with a chat template, prompt/response pairs) are rendered (`jaxtune.data.chat`); a conversation
  or template that cannot be rendered is a bad row like an unparseable one. An empty response
  (prompts may be empty) drops the row as an empty text.
- Rows with an empty text or no label are dropped and counted; rows with suspicious but usable
  content (control characters from a wrong encoding, line breaks inside a text) are kept and
  counted as notes. Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxtune.data.chat import RowError, parse_messages
from jaxtune.data.report import FileReport
from jaxtune.data.schema import COLUMN, OPTION, Schema
from jaxtune.data.specs import Spec
from jaxtune.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
_C1 = re.compile("[\x80-\x9f]")
_BREAK = re.compile("[\r\n]")


@dataclass
class Table:
    """Rows of one file in canonical form, with the line (or record) each came from."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)  # identity for de-duplication, per row
    report: FileReport = None


_Bad = RowError  # a row that cannot be used: message without file/line (added by the caller)


def read_table(spec: Spec, schema: Schema, cfg, split: str) -> Table:
    report = FileReport(file=str(spec.paths[0]) if spec.kind != "idx" else ",".join(map(str, spec.paths)), split=split)
    table = Table(report=report)
    reader = {"csv": _read_delimited, "tsv": _read_delimited, "jsonl": _read_jsonl,
              "images": _read_images, "idx": _read_idx}[spec.kind]
    reader(spec, schema, cfg, table)
    report.kept = len(table.rows)
    if not table.rows:
        what = "; ".join(f"{v} {k}" for k, v in report.dropped.items())
        raise DataError(f"{report.file}: no usable rows" + (f" ({what})" if what else ""))
    return table


# ---------------------------------------------------------------------------------------------
# Text tables


def _decode(path: Path, raw: bytes, cfg, report: FileReport) -> str:
    encoding = "utf-8-sig" if cfg.encoding.lower().replace("_", "-") in ("utf-8", "utf8") else cfg.encoding
    try:
        return raw.decode(encoding)
    except LookupError:
        raise DataError(f"data.encoding: unknown encoding '{cfg.encoding}'") from None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        if not cfg.skip_bad_rows:
            raise DataError(
                f"{path} line {line}: byte 0x{raw[e.start]:02x} is not valid {cfg.encoding}; "
                f"set data.encoding (e.g. latin-1) or data.skip_bad_rows=true"
            ) from None
    text = raw.decode(encoding, errors="replace")
    bad_lines = {raw.count(b"\n", 0, i) + 1 for i in _undecodable_offsets(raw, encoding)}
    for ln in sorted(bad_lines):
        report.note("lines with undecodable bytes (replaced by U+FFFD)", ln)
    return text


def _undecodable_offsets(raw: bytes, encoding: str):
    start = 0
    while start < len(raw):
        try:
            raw[start:].decode(encoding)
            return
        except UnicodeDecodeError as e:
            yield start + e.start
            start += e.end


def unreadable(path, e: OSError) -> DataError:
    """One line for a file the OS will not give us: the file and the OS's reason."""
    if isinstance(e, FileNotFoundError):
        return DataError(f"file not found: {e.filename or path}")
    return DataError(f"cannot read {e.filename or path}: {e.strerror or e}")


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise unreadable(path, e) from None


def _read_text_file(path: Path, cfg, report: FileReport) -> str:
    raw = read_bytes(path)
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    return _decode(path, raw, cfg, report)


def _missing_column(path, key, schema: Schema, found) -> DataError:
    col = schema.column[key]
    if key.startswith(COLUMN):
        t = schema.template_of(col)
        return DataError(
            f"{path}: data.{t.option} {t.text!r} names column '{col}', which the file does not have; "
            f"columns found: {', '.join(map(str, found)) or 'none'}"
        )
    return DataError(
        f"{path}: no column '{col}' (data.{OPTION[key]}); columns found: {', '.join(map(str, found)) or 'none'}"
    )


def _bad_row(table: Table, cfg, path, line: int, msg: str) -> None:
    if not cfg.skip_bad_rows:
        raise DataError(f"{path} line {line}: {msg}")
    table.report.drop("unparseable rows", line)


def _read_delimited(spec: Spec, schema: Schema, cfg, table: Table) -> None:
    path = spec.paths[0]
    text = _read_text_file(path, cfg, table.report)
    tsv = spec.kind == "tsv"
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents are fine
    quoted = cfg.quoting != "none"
    # pandas' defaults (QUOTE_MINIMAL, doublequote) for both; data.quoting=none: quotes are text.
    # strict: text after a closing quote ("5" screen) is an error, not glued on as pandas does, so
    # bare quotes that happen to pair up across lines do not silently merge rows.
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter="\t" if tsv else ",",
        quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE,
        doublequote=True,
        strict=quoted,
    )
    hint = ""  # quotes are the usual cause of a wrong field count: name the option that reads them
    if '"' in text:
        hint = ("; quoted fields are read as pandas reads them (data.quoting=minimal); a file with "
                "bare \" characters needs data.quoting=none" if quoted else
                "; data.quoting=none reads quotes as text: quoted fields with delimiters or line breaks "
                "need data.quoting=minimal")
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: file is empty") from None
    except csv.Error as e:
        raise DataError(f"{path} line 1: cannot parse the header ({e})") from None
    where = {}
    for key, col in schema.columns:
        if col not in header:
            raise _missing_column(path, key, schema, header)
        where[key] = header.index(col)
    while True:
        line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            reason = str(e).replace("\t", "\\t")  # a tab in csv's message: shown as \t
            _bad_row(table, cfg, path, line, f"not valid {'TSV' if tsv else 'CSV'} ({reason}){hint}")
            continue
        if not fields or fields == [""]:
            continue  # blank line
        table.report.rows += 1
        if len(fields) != len(header):
            _bad_row(table, cfg, path, line,
                     f"expected {len(header)} fields ({', '.join(header)}), found {len(fields)}{hint}")
            continue
        _add(table, schema, cfg, path, line, {k: fields[i] for k, i in where.items()})
    if table.report.rows == 0:
        raise DataError(f"{path}: has a header but no data rows")


def _read_jsonl(spec: Spec, schema: Schema, cfg, table: Table) -> None:
    path = spec.paths[0]
    text = _read_text_file(path, cfg, table.report)
    first = True
    for line, s in enumerate(text.split("\n"), 1):  # not splitlines: \u2028 may sit in a string
        if not s.strip():
            continue
        table.report.rows += 1
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            _bad_row(table, cfg, path, line, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            _bad_row(table, cfg, path, line, f"expected a JSON object, found {type(obj).__name__}")
            continue
        missing = [k for k, col in schema.columns if col not in obj]
        if missing:
            if first:
                raise _missing_column(path, missing[0], schema, list(obj))
            col = schema.column[missing[0]]
            _bad_row(table, cfg, path, line, f"no key '{col}' (keys: {', '.join(obj)})")
            continue
        first = False
        _add(table, schema, cfg, path, line, {k: obj[col] for k, col in schema.columns})


def _as_text(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, (dict, list)):
        raise _Bad(f"expected a string, found {type(v).__name__}")
    return v if isinstance(v, str) else str(v)


def _as_words(v) -> list[str]:
    if isinstance(v, str):
        return v.split()
    if isinstance(v, list):
        return [str(w) for w in v]
    raise _Bad(f"expected a list of words, found {type(v).__name__}")


def _as_label(v, schema: Schema):
    """Raw label: str (class name), list of str (multi-label), float (regression), or None."""
    if v is None:
        return None
    if schema.problem_type == "regression":
        try:
            return float(v)
        except (TypeError, ValueError):
            raise _Bad(f"regression label {v!r} is not a number") from None
    if isinstance(v, list):
        return [_label_str(x) for x in v]
    if schema.problem_type == "multi_label_classification":
        raise _Bad("multi-label data needs a list of labels per row (JSONL or TFDS)")
    s = _label_str(v).strip()
    return s or None


def _label_str(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (dict, list)):
        raise _Bad(f"a label must be a string or number, found {type(v).__name__}")
    return str(v)


def _add(table: Table, schema: Schema, cfg, path, line: int, raw: dict) -> None:
    """Convert one row to canonical form; drop it (reported) when empty; note oddities."""
    report = table.report
    if schema.kind == "lm":
        try:
            row, texts = _lm_row(raw, schema)
        except _Bad as e:
            _bad_row(table, cfg, path, line, str(e))
            return
        if row is None:
            report.drop("empty text", line)
            return
        _keep(table, schema, line, row, texts, breaks="messages" not in raw)
        return
    try:
        if schema.kind == "tokens":
            row = {"tokens": _as_words(raw["tokens"]), "tags": _as_words(raw["tags"])}
            if not row["tokens"]:
                report.drop("empty text", line)
                return
            if len(row["tokens"]) != len(row["tags"]):
                raise _Bad(f"{len(row['tokens'])} words but {len(row['tags'])} tags")
            texts = row["tokens"]
        else:
            row = {k: (_as_label(v, schema) if k == "label" else _as_text(v)) for k, v in raw.items()}
            texts = [row[k] for k in schema.text_keys]
            if any(t is None or not t.strip() for t in texts):
                report.drop("empty text", line)
                return
            if "label" in row and row["label"] is None:  # an empty list is a multi-label "none"
                report.drop("missing label", line)
                return
    except _Bad as e:
        _bad_row(table, cfg, path, line, str(e))
        return
    _keep(table, schema, line, row, texts, breaks=schema.kind != "tokens")


def _lm_row(raw: dict, schema: Schema) -> tuple[dict | None, list[str]]:
    """A causal-lm row in stored form (None: nothing to learn, dropped as empty) and the source
    texts it came from (for the report's notes). Chat rows are rendered here."""
    if "messages" in raw:
        messages = parse_messages(raw["messages"])
        text, spans = schema.chat.render(messages)
        return {"text": text, "spans": spans}, [m["content"] for m in messages]
    if "text" in raw:
        text = _as_text(raw["text"])
        return ({"text": text} if text is not None and text.strip() else None), [text or ""]
    values = {k[len(COLUMN):]: _as_text(v) or "" for k, v in raw.items() if k.startswith(COLUMN)}
    pair = {k: _as_text(raw[k]) for k in ("prompt", "response") if k in raw}
    texts = [v or "" for v in pair.values()] + list(values.values())  # as read, before templates
    for k, t in schema.templates:
        pair[k] = t.fill(values)
    prompt, response = pair["prompt"] or "", pair["response"]
    if response is None or not response.strip():
        return None, texts
    if schema.chat is None:
        return {"prompt": prompt, "response": response}, texts
    text, spans = schema.chat.render(schema.chat.one_turn(prompt, response))
    return {"text": text, "spans": spans}, texts


def _keep(table: Table, schema: Schema, line: int, row: dict, texts: list, breaks: bool) -> None:
    """Add a converted row, noting oddities (C1 control characters, line breaks in a text)."""
    report = table.report
    joined = "\n".join(t or "" for t in texts) if schema.kind == "tokens" else "".join(t or "" for t in texts)
    if _C1.search(joined):
        report.note("rows with C1 control characters (bytes of another encoding?)", line)
    if breaks and _BREAK.search(joined):
        report.note("rows with line breaks inside a text", line)
    table.rows.append(row)
    table.lines.append(line)
    table.keys.append(tuple(tuple(t) if isinstance(t, list) else t for t in (row[k] for k in schema.text_keys)))


# ---------------------------------------------------------------------------------------------
# Images


def check_image(data: bytes, path) -> None:
    """Raise DataError naming the file unless PIL can fully decode it."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def _read_images(spec: Spec, schema: Schema, cfg, table: Table) -> None:
    root = spec.paths[0]
    try:
        _read_image_folder(root, cfg, table)
    except OSError as e:  # an unreadable subfolder or image
        raise unreadable(root, e) from None


def _read_image_folder(root: Path, cfg, table: Table) -> None:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class subfolders; expected one subfolder of images per class")
    stray = [f for f in root.iterdir() if f.is_file() and not f.name.startswith(".")]
    if stray:
        table.report.note("files outside class folders (ignored)", n=len(stray))
    n = 0
    for cls in classes:
        for f in sorted((root / cls).rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                table.report.note("non-image files (ignored)")
                continue
            n += 1
            table.report.rows += 1
            data = f.read_bytes()
            try:
                check_image(data, f)
            except DataError:
                if not cfg.skip_bad_rows:
                    raise
                table.report.drop(f"undecodable images (e.g. {f.name})")
                continue
            table.rows.append({"image": f, "label": cls})
            table.lines.append(n)
            table.keys.append(hashlib.sha1(data).hexdigest())
    if n == 0:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX (MNIST format) file, gzip or not, as a numpy array."""
    raw = read_bytes(path)
    if not raw:
        raise DataError(f"{path}: file is empty")
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: broken gzip data ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if ndim == 0 or len(raw) < head:
        raise DataError(f"{path}: IDX header is truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    want = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - head != want:
        raise DataError(
            f"{path}: IDX header says shape {tuple(dims)} ({want} bytes) but the file holds {len(raw) - head} bytes"
        )
    return np.frombuffer(raw, dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def _read_idx(spec: Spec, schema: Schema, cfg, table: Table) -> None:
    images_path, labels_path = spec.paths
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images of shape (N, H, W[, C]), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{labels_path}: expected integer labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if images.ndim == 3:
        images = images[..., None]
    table.report.rows = len(images)
    table.rows = [{"image": images[i], "label": str(int(labels[i]))} for i in range(len(images))]
    table.lines = list(range(1, len(images) + 1))
    table.keys = [hashlib.sha1(images[i].tobytes()).hexdigest() for i in range(len(images))]
