"""Class labels: raw values (strings, numbers) -> class ids, with names kept for `id2label`.

Ids follow a deterministic order of the labels found in the *train* split:
numeric order when every label is an integer ("-1" < "0" < "2" < "10"), otherwise Python string
order (Unicode code points: "Negative" < "negative" < "neutral"). `data.labels` fixes the order
by hand. An eval split may only use labels that train has.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

from jaxtune.errors import DataError

_INT = re.compile(r"[+-]?\d+")


def sorted_labels(labels: Iterable[str]) -> list[str]:
    """
    >>> sorted_labels(['positive', 'negative', 'neutral', 'negative'])
    ['negative', 'neutral', 'positive']
    >>> sorted_labels(['10', '2', '-1'])
    ['-1', '2', '10']
    """
    unique = set(labels)
    if unique and all(_INT.fullmatch(s) for s in unique):
        return sorted(unique, key=lambda s: (int(s), s))
    return sorted(unique)


class LabelMap:
    """Names in id order and the lookup raw label -> id.

    With names given by the user, a raw label is matched by name; an integer label that matches
    no name is taken as an id (so IDX or TFDS integer labels can be given names).
    """

    def __init__(self, names: Sequence[str], *, given: bool = False):
        self.names = list(names)
        self.given = given
        self._index = {n: i for i, n in enumerate(self.names)}
        if len(self._index) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise DataError(f"data.labels: duplicate names: {', '.join(dup)}")

    @classmethod
    def from_train(cls, train_labels: Iterable[str], given: Optional[Sequence[str]]) -> "LabelMap":
        if given:
            return cls([str(n) for n in given], given=True)
        return cls(sorted_labels(train_labels))

    def id(self, raw: str) -> Optional[int]:
        i = self._index.get(raw)
        if i is None and self.given and _INT.fullmatch(raw) and raw not in self._index:
            j = int(raw)
            if 0 <= j < len(self.names):
                return j
        return i

    def unknown(self, raw: str, where: str, split: str) -> DataError:
        shown = ", ".join(self.names[:20]) + (", ..." if len(self.names) > 20 else "")
        if self.given:
            return DataError(f"{where}: label '{raw}' is not in data.labels ({shown})")
        return DataError(
            f"{where}: label '{raw}' of the {split} split does not occur in train (train labels: {shown})"
        )
