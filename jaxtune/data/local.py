"""Local files -> a TFDS array_record dataset in a fingerprinted cache folder.

`prepare_local` reads the files of every split, maps labels to ids, drops duplicates, holds out
validation/test from train when they are not given, and writes the result with a TFDS
`GeneratorBasedBuilder` (file_format='array_record', no TensorFlow) to

    CACHE/local/<train file stem>-<fingerprint>/   jaxtune.json (labels, report, counts)
                                                   local_data/1.0.0/ (the TFDS dataset)

The fingerprint covers the content of every file (for image folders: names, sizes and
modification times) and every option that changes the result (the schema's repr holds the columns,
causal-lm's text templates and the tokenizer's chat template text and special tokens), so a later run with the same
inputs reuses the folder and a changed file or option builds a new one. Folders are written under
a temporary name and renamed when complete, so an interrupted or concurrent build never leaves a
half-written dataset behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_builder, dataset_info

from jaxtune.data.audio import read_audio_tables
from jaxtune.data.labels import LabelMap
from jaxtune.data.readers import Table, read_bytes, read_table, unreadable
from jaxtune.data.report import DataReport
from jaxtune.data.schema import Schema
from jaxtune.data.sources import Prepared, SplitSource
from jaxtune.data.specs import Spec
from jaxtune.data.splits import dedup_default, deduplicate, heldout_fractions, holdout_from_train
from jaxtune.errors import DataError

FORMAT_VERSION = 1  # bump when what is written changes
BUILDER_NAME = "local_data"
META = "jaxtune.json"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fingerprint(specs: dict[str, Spec], schema: Schema, options: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "schema": repr(schema), "options": options}, sort_keys=True, default=str).encode())
    for split in sorted(specs):
        spec = specs[split]
        h.update(f"{split}|{spec.kind}".encode())
        for p in spec.paths:
            try:
                h.update((_dir_digest(p) if p.is_dir() else _file_digest(p)).encode())
            except OSError as e:  # no permission, an I/O error: the file and the OS's reason
                raise unreadable(p, e) from None
    return h.hexdigest()


def prepare_local(specs: dict[str, Spec], schema: Schema, cfg, cache_root: Path) -> Prepared:
    kinds = {s.kind for s in specs.values()}
    if schema.kind == "image":
        if kinds - {"images", "idx"}:
            raise DataError("image-classification reads images:DIR or idx:FILES specs (or tfds:), not tables")
        if len(kinds) > 1:
            raise DataError("mixing images: and idx: specs across splits is not supported")
    elif kinds & {"images", "idx"}:
        raise DataError(f"images:/idx: data needs task image-classification, not a {schema.kind} task")
    if schema.kind != "audio" and "audio" in kinds:
        raise DataError(f"audio: data needs a speech task (ctc), not a {schema.kind} task")
    held = heldout_fractions(cfg, specs)
    options = {
        "encoding": cfg.encoding,
        "quoting": cfg.quoting,
        "labels": cfg.labels,
        "heldout": held,
        "split_seed": cfg.split_seed if held else None,
        "deduplicate": dedup_default(cfg, schema),
        "skip_bad_rows": cfg.skip_bad_rows,
    }
    if schema.kind == "audio":  # a table's audio files (under its folder) count like its content
        options["audio_files"] = {s: _dir_digest(spec.paths[0].parent) for s, spec in specs.items()
                                  if spec.kind != "audio"}
    fp = fingerprint(specs, schema, options)
    stem = specs["train"].paths[0].stem.split(".")[0] or "data"
    final = Path(cache_root) / "local" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:40]}-{fp[:16]}"
    if not (final / META).exists():
        _build(final, specs, schema, cfg, held, options["deduplicate"])
    return open_local(final)


def _cache_error(folder: Path, e: OSError) -> DataError:
    return DataError(f"cannot write the data cache {folder}: {e.strerror or e} (set data.cache_dir to a writable folder)")


def _encode_labels(tables: dict[str, Table], schema: Schema, cfg) -> tuple[Optional[list[str]], Optional[str]]:
    """Replace raw labels by ids in place; returns (label names, problem type)."""
    key = schema.label_key
    if key is None:
        return None, None
    train = tables["train"].rows
    problem = schema.problem_type
    if schema.kind == "text" and problem is None:
        multi = any(isinstance(r["label"], list) for r in train)
        problem = "multi_label_classification" if multi else "single_label_classification"
    if problem == "regression":
        return None, problem
    many = key == "tags" or problem == "multi_label_classification"
    if many:
        for t in tables.values():
            for r in t.rows:
                if isinstance(r[key], str):
                    r[key] = [r[key]]
        raw = [x for r in train for x in r[key]]
    else:
        for t in tables.values():
            for r, line in zip(t.rows, t.lines):
                if isinstance(r[key], list):
                    raise DataError(f"{t.report.file} line {line}: a list of labels in single-label data")
        raw = [r[key] for r in train]
    lm = LabelMap.from_train(raw, cfg.labels)
    for split, t in tables.items():
        for r, line in zip(t.rows, t.lines):
            vals = r[key] if many else [r[key]]
            ids = []
            for v in vals:
                i = lm.id(v)
                if i is None:
                    where = f"{t.report.file} {'record' if schema.kind == 'image' else 'line'} {line}"
                    raise lm.unknown(v, where, split)
                ids.append(i)
            r[key] = ids if many else ids[0]
    return lm.names, (problem if schema.kind == "text" else None)


def _features(schema: Schema, problem: Optional[str], names, tables: dict[str, Table]):
    F = tfds.features
    if schema.kind == "text":
        d = {k: F.Text() for k in schema.text_keys}
        if problem == "regression":
            d["label"] = F.Scalar(np.float32)
        elif problem == "multi_label_classification":
            d["label"] = F.Sequence(F.ClassLabel(names=names))
        else:
            d["label"] = F.ClassLabel(names=names)
    elif schema.kind == "tokens":
        d = {"tokens": F.Sequence(F.Text()), "tags": F.Sequence(F.ClassLabel(names=names))}
    elif schema.kind == "lm":
        d = {k: F.Tensor(shape=(None,), dtype=np.int64) if k == "spans" else F.Text() for k in schema.stored}
    elif schema.kind == "seq2seq":
        d = {"source": F.Text(), "target": F.Text()}
    elif schema.kind == "audio":  # the waveform as a plain Tensor: tfds' Audio feature needs TensorFlow
        d = {"audio": F.Tensor(shape=(None,), dtype=np.float32), "text": F.Text()}
    else:
        first = tables["train"].rows[0]["image"]
        if isinstance(first, np.ndarray):  # IDX: raw pixels, no PNG round trip
            for split, t in tables.items():
                shape = t.rows[0]["image"].shape if t.rows else first.shape
                if shape != first.shape:
                    raise DataError(f"{t.report.file}: images are {shape}, train images are {first.shape}")
            image = F.Tensor(shape=first.shape, dtype=np.uint8)
        else:  # image folder: the encoded file bytes, decoded with PIL in the pipeline
            image = F.Tensor(shape=(), dtype=np.object_)
        d = {"image": image, "label": F.ClassLabel(names=names)}
    return F.FeaturesDict(d)


def _build(final: Path, specs, schema: Schema, cfg, held: dict[str, float], dedup: bool) -> None:
    if schema.kind == "audio":  # decoded, resampled, checked; the labels are the vocabulary
        tables, names = read_audio_tables(specs, schema, cfg)
        problem = None
    else:
        tables = {split: read_table(spec, schema, cfg, split) for split, spec in specs.items()}
        names, problem = _encode_labels(tables, schema, cfg)
    key = schema.label_key
    if dedup:
        keep = deduplicate(
            {s: t.keys for s, t in tables.items()},
            {s: ([r[key] for r in t.rows] if key else None) for s, t in tables.items()},
            {s: t.report for s, t in tables.items()},
            {s: t.lines for s, t in tables.items()},
            what={"image": "image", "audio": "recording"}.get(schema.kind, "text"),
        )
        for s, t in tables.items():
            m = keep[s]
            t.rows = [r for r, k in zip(t.rows, m) if k]
            t.lines = [x for x, k in zip(t.lines, m) if k]
            t.report.kept = len(t.rows)
            if not t.rows:
                raise DataError(f"{t.report.file}: no rows left after removing duplicates of earlier splits")
    rows = {s: t.rows for s, t in tables.items()}
    notes = []
    if held:
        train = rows["train"]
        parts, note = holdout_from_train(len(train), held, cfg.split_seed, schema, problem, lambda i: train[i]["label"])
        for k, idx in parts.items():
            rows[k] = [train[i] for i in idx]
        notes.append(note)
    features = _features(schema, problem, names, tables)
    meta = {
        "format": FORMAT_VERSION,
        "label_names": names,
        "problem_type": problem,
        "num_examples": {s: len(r) for s, r in rows.items()},
        "columns": list(schema.stored),
        "specs": {s: spec.text for s, spec in specs.items()},
        "report": DataReport(t.report for t in tables.values()).to_json(),
        "notes": notes,
    }
    _write(final, features, rows, meta)


def _example(row: dict) -> dict:
    img = row.get("image")
    if isinstance(img, Path):
        return {**row, "image": read_bytes(img)}
    return row


def _write(final: Path, features, rows: dict[str, list[dict]], meta: dict) -> None:
    class LocalData(dataset_builder.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        # A one-part module name stops TFDS looking for checksum files inside our package.
        __module__ = "jaxtune_local_data"

        def _info(self):
            # disable_shuffling keeps records in the order written (file order within a split).
            return dataset_info.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {s: ((i, _example(r)) for i, r in enumerate(rs)) for s, rs in rows.items()}

        def _generate_examples(self):
            raise NotImplementedError

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cache_error(final.parent, e) from None
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tfds.disable_progress_bar()
        with contextlib.redirect_stdout(io.StringIO()):
            LocalData(data_dir=str(tmp), file_format="array_record").download_and_prepare()
        shutil.rmtree(tmp / "downloads", ignore_errors=True)
        (tmp / META).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META).exists():  # not a concurrent build that won the race
                raise
    except OSError as e:  # no permission, a full disk: the folder and the OS's reason
        raise _cache_error(final.parent, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_local(folder: Path) -> Prepared:
    meta = json.loads((folder / META).read_text())
    builder = tfds.builder_from_directory(str(folder / BUILDER_NAME / "1.0.0"))
    columns = {k: k for k in meta["columns"]}
    splits = {
        s: SplitSource(builder.as_data_source(split=s), columns, name=s) for s in meta["num_examples"]
    }
    return Prepared(
        splits=splits,
        label_names=meta["label_names"],
        problem_type=meta["problem_type"],
        report=DataReport.from_json(meta["report"]),
        location=str(folder),
        notes=meta["notes"],
    )
