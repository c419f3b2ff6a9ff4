"""Which fields a task needs and where they come from.

Every source is read into *canonical* examples, whatever its column names; a task reads the kind
its `Task.data_kind` names (`jaxtune/tasks/<task>.py`):

    kind 'text'    text, [text_pair], label      (sequence-classification)
    kind 'tokens'  tokens (list of words), tags  (token-classification)
    kind 'lm'      text, or prompt + response    (causal-lm)
    kind 'image'   image, label                  (image-classification)

`Schema.columns` maps each canonical key to the column (CSV header, JSON key, TFDS feature) that
holds it, as named by the `data.*_column` options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jaxtune.errors import DataError
from jaxtune.tasks import get_task

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
# Which recipe option names each canonical column (for error messages).
OPTION = {
    "text": "text_column",
    "tokens": "text_column",
    "text_pair": "text_pair_column",
    "label": "label_column",
    "tags": "label_column",
    "prompt": "prompt_column",
    "response": "response_column",
    "image": "image_column",
}


@dataclass(frozen=True)
class Schema:
    kind: str
    columns: tuple[tuple[str, str], ...]  # (canonical key, source column), required first
    optional: tuple[str, ...] = ()  # canonical keys that may be absent
    label_key: Optional[str] = None  # 'label' or 'tags'; None for causal-lm
    problem_type: Optional[str] = None  # kind 'text' only; None: decided by the labels

    @property
    def column(self) -> dict[str, str]:
        return dict(self.columns)

    @property
    def text_keys(self) -> tuple[str, ...]:
        """Keys whose values identify an example for de-duplication."""
        return tuple(k for k, _ in self.columns if k != self.label_key)


def make_schema(cfg, task: str, problem_type: Optional[str] = None) -> Schema:
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise DataError(f"problem_type {problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
    kind = get_task(task).data_kind  # the task says which examples it reads
    if kind == "text":
        cols = [("text", cfg.text_column)]
        if cfg.text_pair_column:
            cols.append(("text_pair", cfg.text_pair_column))
        cols.append(("label", cfg.label_column))
        return Schema(kind, tuple(cols), label_key="label", problem_type=problem_type)
    if kind == "tokens":
        return Schema(kind, (("tokens", cfg.text_column), ("tags", cfg.label_column)), label_key="tags")
    if kind == "lm":
        if bool(cfg.prompt_column) != bool(cfg.response_column):
            raise DataError("causal-lm: set both data.prompt_column and data.response_column, or neither")
        if cfg.prompt_column:
            return Schema(kind, (("prompt", cfg.prompt_column), ("response", cfg.response_column)))
        return Schema(kind, (("text", cfg.text_column),))
    return Schema(kind, (("image", cfg.image_column), ("label", cfg.label_column)), label_key="label")
