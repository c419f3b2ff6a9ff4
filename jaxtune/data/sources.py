"""Random-access splits of canonical examples, over TFDS array_record data sources.

Both TFDS datasets and converted local files end here: a `SplitSource` wraps a
`tfds.data_source(...)` (an ArrayRecordDataSource), optionally restricted to a subset of record
indices (held-out splits, de-duplication), and renames the dataset's features to the canonical
keys of `jaxtune.data.schema`. It is picklable, so Grain worker processes can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from jaxtune.data.report import DataReport


def _text(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return _text(v.item())
    return str(v)


def _canonical(key: str, v):
    if key in ("text", "text_pair", "prompt", "response", "source", "target"):
        return _text(v)
    if key == "tokens":
        return [_text(w) for w in v]
    if key in ("tags", "spans"):
        return np.asarray(v, np.int64).reshape(-1)
    if key == "label":
        a = np.asarray(v)
        if a.dtype.kind == "f":
            return float(a) if a.ndim == 0 else a.astype(np.float32)
        return int(a) if a.ndim == 0 else a.astype(np.int64).reshape(-1)
    if key == "image":
        if isinstance(v, np.ndarray) and v.dtype == object:
            v = v.item()
        return v  # uint8 array (H, W, C) or encoded bytes
    return v


class SplitSource(Sequence):
    """len() and [i] over canonical example dicts of one split."""

    def __init__(self, source, columns: dict[str, str], indices: Optional[np.ndarray] = None, name: str = ""):
        self.source = source
        self.columns = dict(columns)  # canonical key -> feature name in `source`
        self.indices = None if indices is None else np.asarray(indices, np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def record_index(self, i: int) -> int:
        return int(i) if self.indices is None else int(self.indices[i])

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.source[self.record_index(i)]
        return {k: _canonical(k, rec[col]) for k, col in self.columns.items() if col in rec}

    def get_many(self, positions) -> list[dict[str, Any]]:
        """Examples at `positions`, read in one batched call when the source supports it."""
        keys = [self.record_index(i) for i in positions]
        try:
            recs = self.source.__getitems__(keys)
        except (AttributeError, TypeError):  # e.g. tfds.testing.mock_data sources
            recs = [self.source[k] for k in keys]
        return [{k: _canonical(k, rec[col]) for k, col in self.columns.items() if col in rec} for rec in recs]

    def __repr__(self) -> str:
        return f"SplitSource({self.name!r}, {len(self)} examples)"


@dataclass
class Prepared:
    """What `build_data` needs from a source: splits, labels and the report."""

    splits: dict[str, SplitSource]
    label_names: Optional[list[str]]
    problem_type: Optional[str]
    report: DataReport = field(default_factory=DataReport)
    location: str = ""  # cache folder or TFDS name, for messages
    notes: list[str] = field(default_factory=list)  # how splits were made
