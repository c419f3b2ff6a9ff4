"""Named TFDS datasets, read with `tfds.data_source` (array_record, no TensorFlow).

`tfds:NAME[/CONFIG][:SPLIT]`: SPLIT defaults to the role (train, validation, test) and may use
TFDS slicing (`train[:90%]`). The dataset must already be prepared in array_record format in
`data.data_dir` (local or gs://); nothing is downloaded. Held-out splits and de-duplication are
index subsets of the records, computed once (reading every record) and cached in
CACHE/tfds/<name>-<fingerprint>.npz.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from jaxtune.data.report import DataReport, FileReport
from jaxtune.data.schema import OPTION, Schema
from jaxtune.data.sources import Prepared, SplitSource
from jaxtune.data.specs import Spec
from jaxtune.data.splits import dedup_default, deduplicate, heldout_fractions, holdout_from_train
from jaxtune.errors import DataError


def _builder(name: str, data_dir: Optional[str]):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        pass
    # Some collections (glue, ...) register their builders on import of their category module.
    for module in ("text", "image_classification", "image", "structured", "question_answering", "summarization", "translate"):
        try:
            importlib.import_module(f"tensorflow_datasets.{module}")
        except Exception:  # a category needing TensorFlow: skip it
            continue
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"tfds:{name}: no such TFDS dataset") from None
    except ValueError as e:  # bad config name and the like
        raise DataError(f"tfds:{name}: {str(e).splitlines()[0]}") from None


def _label_info(feature, schema: Schema, cfg, where: str):
    """(names or None, problem type or None) for the label feature of a TFDS dataset."""
    F = tfds.features
    names, problem = None, None
    if isinstance(feature, F.ClassLabel) and schema.kind != "tokens":
        names, problem = list(feature.names), "single_label_classification"
    elif isinstance(feature, F.Sequence) and isinstance(feature.feature, F.ClassLabel):
        names = list(feature.feature.names)
        problem = None if schema.kind == "tokens" else "multi_label_classification"
    elif schema.kind == "text" and np.dtype(feature.np_dtype).kind == "f":
        problem = "regression"
    elif schema.kind != "tokens" and np.dtype(feature.np_dtype).kind in "iu" and cfg.labels:
        names, problem = None, "single_label_classification"
    else:
        raise DataError(
            f"{where}: feature '{schema.column[schema.label_key]}' is {type(feature).__name__}, "
            f"not class labels{'' if schema.kind == 'tokens' else '; give data.labels for integer labels'}"
        )
    if cfg.labels:
        if names is not None and len(cfg.labels) != len(names):
            raise DataError(f"{where}: data.labels has {len(cfg.labels)} names but the dataset has {len(names)} classes")
        names = list(cfg.labels)
    if schema.kind == "image" or schema.kind == "tokens":
        problem = None
    return names, problem


def open_tfds(specs: dict[str, Spec], schema: Schema, cfg, cache_root: Path) -> Prepared:
    if any(s.is_local for s in specs.values()):
        raise DataError("mixing tfds: specs with local files across splits is not supported")
    sources, infos = {}, {}
    label_names, problem = None, None
    for role, spec in specs.items():
        builder = _builder(spec.name, cfg.data_dir)
        split = spec.split or role
        where = f"tfds:{spec.name}:{split}"
        features = builder.info.features
        for key, col in schema.columns:
            if col not in features:
                raise DataError(
                    f"tfds:{spec.name}: no feature '{col}' (data.{OPTION[key]}); features found: {', '.join(features)}"
                )
        if role == "train" and schema.label_key:
            label_names, problem = _label_info(features[schema.column[schema.label_key]], schema, cfg, where)
            if schema.problem_type and problem and schema.problem_type != problem:
                raise DataError(f"{where}: labels are {problem} but problem_type is {schema.problem_type}")
        try:
            src = tfds.data_source(spec.name, split=split, data_dir=cfg.data_dir, download=False)
        except (AssertionError, NotImplementedError, FileNotFoundError) as e:
            state = "not prepared" if not builder.is_prepared() else f"not readable ({str(e).splitlines()[0][:100]})"
            raise DataError(
                f"{where}: {state} in {cfg.data_dir or 'the default TFDS data_dir'}; nothing is downloaded: "
                f"prepare it once with `tfds build {spec.name} --file_format=array_record` or set data.data_dir"
            ) from None
        except ValueError as e:  # unknown split
            raise DataError(f"{where}: {str(e).splitlines()[0]}") from None
        sources[role] = src
        infos[role] = (spec.name, str(builder.info.version), split, len(src))
    columns = dict(schema.columns)
    splits = {role: SplitSource(src, columns, name=role) for role, src in sources.items()}
    held = heldout_fractions(cfg, specs)
    dedup = dedup_default(cfg, schema)
    report, notes = DataReport(), []
    if held or dedup:
        key = json.dumps({"splits": infos, "data_dir": cfg.data_dir, "schema": repr(schema), "held": held,
                          "seed": cfg.split_seed, "dedup": dedup}, sort_keys=True)
        fp = hashlib.sha256(key.encode()).hexdigest()[:16]
        path = Path(cache_root) / "tfds" / f"{specs['train'].name.replace('/', '_')}-{fp}.npz"
        if not path.exists():
            _scan(path, splits, schema, cfg, held, dedup, problem, {r: s.text for r, s in specs.items()})
        with np.load(path, allow_pickle=False) as z:
            indices = {k: z[k] for k in z.files if k != "meta"}
            meta = json.loads(str(z["meta"]))
        report, notes = DataReport.from_json(meta["report"]), meta["notes"]
        base = {role: s.source for role, s in splits.items()}
        splits = {k: SplitSource(base[meta["base"][k]], columns, idx, name=k) for k, idx in indices.items()}
    return Prepared(splits, label_names, problem, report, location=", ".join(s.text for s in specs.values()), notes=notes)


def _key(ex: dict, schema: Schema) -> str:
    h = hashlib.sha1()
    for k in schema.text_keys:
        v = ex[k]
        h.update(v.tobytes() if isinstance(v, np.ndarray) else "\x1f".join(v).encode() if isinstance(v, list) else str(v).encode())
        h.update(b"\x1e")
    return h.hexdigest()


def _scan(path: Path, splits: dict[str, SplitSource], schema: Schema, cfg, held, dedup: bool, problem, names: dict) -> None:
    """Read every record once: dedup keys and labels -> index subsets per split, saved to `path`."""
    keys, labels, reports = {}, {}, {}
    for role, s in splits.items():
        ks, ls = [], []
        for i in range(len(s)):
            ex = s[i]
            ks.append(_key(ex, schema) if dedup else i)
            ls.append(ex.get(schema.label_key) if schema.label_key else None)
        keys[role], labels[role] = ks, ls
        reports[role] = FileReport(file=names[role], split=role, rows=len(s))
    keep = {r: np.ones(len(k), bool) for r, k in keys.items()}
    if dedup:
        lab = {r: (l if schema.label_key else None) for r, l in labels.items()}
        keep = deduplicate(keys, lab, reports, {r: None for r in keys}, what="image" if schema.kind == "image" else "text")
    indices = {r: np.flatnonzero(m) for r, m in keep.items()}
    for r, rep in reports.items():
        rep.kept = int(keep[r].sum())
        if rep.rows and not rep.kept:
            raise DataError(f"{rep.file}: every example duplicates one of an earlier split; set data.deduplicate=false to keep them")
    base = {r: r for r in indices}
    notes = []
    if held:
        train_idx = indices["train"]
        parts, note = holdout_from_train(len(train_idx), held, cfg.split_seed, schema, problem,
                                         lambda i: labels["train"][train_idx[i]])
        for k, idx in parts.items():
            indices[k] = train_idx[idx]
            base[k] = "train"
        notes.append(note)
    meta = {"report": DataReport(reports.values()).to_json(), "notes": notes, "base": base}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **indices)
    os.replace(tmp, path)
