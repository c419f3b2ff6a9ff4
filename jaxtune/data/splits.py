"""Held-out splits and de-duplication, shared by local files and TFDS datasets.

`holdout` draws validation/test examples from train: seeded, stratified by class when labels are
given. Sizes follow scikit-learn's `train_test_split`: ceil(fraction * n) per held-out split, the
rest is train. Per class, ids are shared out by largest remainder so that the class proportions
match as closely as integers allow, and every class keeps at least one train example.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Optional, Sequence

import numpy as np

from jaxtune.data.schema import Schema
from jaxtune.errors import DataError


def heldout_fractions(cfg, given) -> dict[str, float]:
    """{split: data.<split>_fraction} for validation/test when `given` (the specs) lacks them."""
    return {k: f for k, f in (("validation", cfg.validation_fraction), ("test", cfg.test_fraction)) if k not in given and f > 0}


def dedup_default(cfg, schema: Schema) -> bool:
    """data.deduplicate, or by default on for text and off for images."""
    return cfg.deduplicate if cfg.deduplicate is not None else schema.kind != "image"


def _allocate(total: int, counts: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Integers per class, near total * counts / sum(counts), each <= cap, summing to
    min(total, sum(cap)). Ties go to the lower class id."""
    quota = total * counts / max(counts.sum(), 1)
    out = np.minimum(np.floor(quota).astype(np.int64), cap)
    order = sorted(range(len(counts)), key=lambda c: (-(quota[c] - math.floor(quota[c])), c))
    need = min(total, int(cap.sum())) - int(out.sum())
    while need > 0:
        moved = False
        for c in order:
            if need and out[c] < cap[c]:
                out[c] += 1
                need -= 1
                moved = True
        if not moved:
            break
    return out


def holdout(
    n: int,
    fractions: dict[str, float],
    seed: int,
    labels: Optional[np.ndarray] = None,
) -> dict[str, np.ndarray]:
    """Split range(n) into 'train' and the held-out splits in `fractions` (e.g. validation: 0.1).

    Returns sorted index arrays. `labels` (n,) int class ids makes it stratified.

    >>> s = holdout(10, {'validation': 0.2}, seed=0, labels=np.array([0] * 5 + [1] * 5))
    >>> len(s['train']), len(s['validation']), np.array([0] * 5 + [1] * 5)[s['validation']].tolist()
    (8, 2, [0, 1])
    """
    names = [k for k, f in fractions.items() if f > 0]
    sizes = {k: math.ceil(fractions[k] * n) for k in names}
    if sum(sizes.values()) >= n:
        raise DataError(
            f"cannot hold out {', '.join(f'{k} {fractions[k]:g}' for k in names)} of {n} examples "
            "and keep any for training; lower data.validation_fraction / data.test_fraction"
        )
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ["train", *names]}
    if labels is None:
        perm = rng.permutation(n)
        start = 0
        for k in names:
            out[k] = perm[start : start + sizes[k]]
            start += sizes[k]
        out["train"] = perm[start:]
    else:
        labels = np.asarray(labels)
        classes = np.unique(labels)
        members = [np.flatnonzero(labels == c) for c in classes]
        counts = np.array([len(m) for m in members])
        left = np.maximum(counts - 1, 0)  # every class keeps one train example
        take = {}
        for k in names:
            take[k] = _allocate(sizes[k], counts, left)
            left = left - take[k]
        for c, m in enumerate(members):
            m = rng.permutation(m)
            start = 0
            for k in names:
                out[k].append(m[start : start + take[k][c]])
                start += take[k][c]
            out["train"].append(m[start:])
        out = {k: np.concatenate(v) if len(v) else np.zeros(0, np.int64) for k, v in out.items()}
    return {k: np.sort(np.asarray(v, np.int64)) for k, v in out.items()}


def holdout_from_train(n: int, held: dict[str, float], seed: int, schema: Schema, problem: Optional[str],
                       label_of: Callable[[int], Any]) -> tuple[dict[str, np.ndarray], str]:
    """`holdout` of the `n` train examples (stratified by `label_of(i)` for single-label and image
    data) and the note for the log that says what was held out."""
    stratified = problem == "single_label_classification" or schema.kind == "image"
    labels = np.array([label_of(i) for i in range(n)]) if stratified else None
    note = (f"{', '.join(f'{k} ({held[k]:g})' for k in held)} held out from train: "
            f"{'stratified by label, ' if stratified else ''}seed {seed}")
    return holdout(n, held, seed, labels), note


SPLIT_ORDER = ("train", "validation", "test")


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def deduplicate(
    keys: dict[str, Sequence], labels: dict[str, Optional[Sequence]], reports: dict, lines: dict, what: str = "text"
) -> dict[str, np.ndarray]:
    """Keep-masks per split so that every key occurs once over all splits, in the split that comes
    first in train, validation, test order (validation never holds a train text). Each dropped
    row is counted in its split's FileReport with the reason (and line)."""
    first: dict[Hashable, tuple[str, object]] = {}  # key -> (split, label of the kept row)
    keep = {}
    for split in [s for s in SPLIT_ORDER if s in keys] + [s for s in keys if s not in SPLIT_ORDER]:
        ks, labs, report = keys[split], labels.get(split), reports[split]
        mask = np.ones(len(ks), bool)
        for i, k in enumerate(ks):
            line = lines[split][i] if lines.get(split) is not None else None
            if k in first:
                mask[i] = False
                where, lab = first[k]
                if where != split:
                    report.drop(f"duplicates of a {where} example", line)
                elif labs is None or _same(labs[i], lab):
                    report.drop(f"duplicate {what}" + (" (same label)" if labs is not None else ""), line)
                else:
                    report.drop(f"duplicate {what} with another label (first row kept)", line)
            else:
                first[k] = (split, None if labs is None else labs[i])
        keep[split] = mask
    return keep
