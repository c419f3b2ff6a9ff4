"""Causal-LM packing (`data.pack: true`): several tokenized examples per row of `data.max_length`.

A split's *layout* (which examples share a row) is computed once, when the data is built, from
every example's token count (the split is tokenized once for that): examples are placed first-fit,
each into the first row with room left (as `pack_examples` does for given examples), in a
seeded random order for train (so a row mixes examples from the whole file) and in split order for
evaluation. The layout stays fixed; training then visits its *rows* in a new shuffled order each
epoch, exactly as unpacked training visits examples. So the train iterator stays a pure function
of the step (resumable from its step count alone, the same on every process), an epoch is
ceil(rows / batch_size) steps, `train.batch_size` counts rows, and every example is in exactly one
row: once per epoch, and once in an evaluation.

A packed row (all rows are `max_length` long) holds `input_ids`, `attention_mask`, `labels`
(-100 on prompt tokens and padding), `segment_ids` (1, 2, ... for the examples of the row, 0 on
padding) and `position_ids` (0, 1, ... restarting at each example). The model attends only within
an example and the causal-LM loss never predicts an example's first token from its neighbour, so
token-weighted metrics over a packed split equal those of the same split unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from jaxtune.data.text import IGNORE
from jaxtune.errors import DataError

_CHUNK = 1024  # examples tokenized per call when measuring a split


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of positions into `lengths`: each item goes into the first row with room left.

    A max-tree over the rows' free space finds that row in O(log n) per item.

    >>> first_fit([5, 3, 7, 2, 6, 4], 16)
    [[0, 1, 2], [3, 4, 5]]
    >>> first_fit([9, 9, 2, 7], 10)
    [[0], [1], [2, 3]]
    """
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = np.full(2 * size, capacity, np.int64)  # leaves: rows, opened or not, in order
    rows: list[list[int]] = []
    for i, length in enumerate(lengths):
        length = min(int(length), capacity)
        node = 1
        while node < size:  # the leftmost leaf with free space >= length
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        r = node - size
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


@dataclass(frozen=True)
class Layout:
    """The rows of a packed split: row r holds split positions members[starts[r]:starts[r + 1]]."""

    starts: np.ndarray  # (rows + 1,) int64
    members: np.ndarray  # (examples,) int64
    tokens: int  # real tokens over all rows
    length: int  # tokens per row

    @property
    def rows(self) -> int:
        return len(self.starts) - 1

    def row(self, r: int) -> np.ndarray:
        return self.members[self.starts[r]:self.starts[r + 1]]

    def fill(self) -> float:
        """The fraction of row slots holding real tokens."""
        return self.tokens / max(1, self.rows * self.length)


def token_lengths(source, encoder) -> np.ndarray:
    """(len(source),) each example's token count as `encoder` encodes it (truncated)."""
    out = np.zeros(len(source), np.int64)
    for lo in range(0, len(source), _CHUNK):
        positions = range(lo, min(lo + _CHUNK, len(source)))
        out[lo:lo + len(positions)] = [len(e[0]) for e in encoder.encode(source.get_many(positions))]
    return out


def make_layout(lengths: np.ndarray, length: int, seed: Optional[int]) -> Layout:
    """First-fit rows of `length` tokens over examples in a seeded random order (`seed`) or in
    order (None). Examples with no tokens still get a place (they add nothing)."""
    n = len(lengths)
    order = np.arange(n) if seed is None else np.random.default_rng([seed % 2**32, 0x9ACC]).permutation(n)
    rows = first_fit(np.minimum(lengths[order], length), length)
    members = np.array([order[i] for row in rows for i in row], np.int64)
    starts = np.cumsum([0] + [len(row) for row in rows]).astype(np.int64)
    return Layout(starts, members, int(np.minimum(lengths, length).sum()), length)


def fill_rows(rows: Sequence[Sequence[tuple]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows of encoded examples `(ids, _, labels)` -> the packed arrays (R, length), see above."""
    R = len(rows)
    out = {
        "input_ids": np.full((R, length), pad_id, np.int32),
        "attention_mask": np.zeros((R, length), np.int32),
        "labels": np.full((R, length), IGNORE, np.int32),
        "segment_ids": np.zeros((R, length), np.int32),
        "position_ids": np.zeros((R, length), np.int32),
    }
    for r, row in enumerate(rows):
        t = 0
        for s, (ids, _, labels) in enumerate(row, start=1):
            n = min(len(ids), length - t)  # the layout guarantees room; never write past the row
            out["input_ids"][r, t:t + n] = ids[:n]
            out["attention_mask"][r, t:t + n] = 1
            out["labels"][r, t:t + n] = labels[:n]
            out["segment_ids"][r, t:t + n] = s
            out["position_ids"][r, t:t + n] = np.arange(n)
            t += n
    return out


def pack_examples(examples: Iterable[dict], length: int, pad_id: int = 0,
                  max_rows: Optional[int] = None) -> dict[str, np.ndarray]:
    """Pack examples (`input_ids`, optional `labels`, sequences of ints) into rows of `length` tokens.

    First fit, in order (`first_fit`): each example goes into the first row with room left (longer
    examples are cut to `length`; empty ones are skipped). Returns the arrays of `fill_rows` plus
    `weights` (1 per row), all (rows, length) except weights (rows,). `max_rows` caps the rows
    (more examples: an error).

    >>> pack_examples([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], length=4)["segment_ids"].tolist()
    [[1, 1, 1, 2]]
    """
    encoded = []
    for ex in examples:
        ids = list(ex["input_ids"])[:length]
        labels = list(ex.get("labels", ids))[:length]
        if len(labels) != len(ids):
            raise DataError(f"pack_examples: labels ({len(labels)}) and input_ids ({len(ids)}) differ in length")
        if ids:
            encoded.append((ids, None, labels))
    rows = first_fit([len(ids) for ids, _, _ in encoded], length)
    if max_rows is not None and len(rows) > max_rows:
        raise DataError(f"pack_examples: the examples need {len(rows)} rows of {length}, more than {max_rows}")
    out = fill_rows([[encoded[i] for i in row] for row in rows], length, pad_id)
    out["weights"] = np.ones((len(rows),), np.float32)
    return out


class PackedBatch:
    """Plan (row indices, weights) -> this process's rows, packed. Picklable (Grain workers)."""

    def __init__(self, source, encoder, layout: Layout, shard_index: int, shard_count: int):
        self.source, self.encoder, self.layout = source, encoder, layout
        self.shard_index, self.shard_count = shard_index, shard_count

    def __call__(self, plan: dict) -> dict[str, np.ndarray]:
        index, weights = plan["index"], plan["weights"]
        b = len(index) // self.shard_count
        lo, hi = self.shard_index * b, (self.shard_index + 1) * b
        members = [self.layout.row(int(r)) for r in index[lo:hi]]
        encoded = self.encoder.encode(self.source.get_many(np.concatenate(members)))
        rows, k = [], 0
        for m in members:
            rows.append(encoded[k:k + len(m)])
            k += len(m)
        out = fill_rows(rows, self.layout.length, self.encoder.pad_id)
        out["weights"] = weights[lo:hi].copy()
        return out


__all__ = ["Layout", "PackedBatch", "fill_rows", "first_fit", "make_layout", "pack_examples", "token_lengths"]
