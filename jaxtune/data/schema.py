"""Which fields a task needs and where they come from.

Every source is read into *canonical* examples, whatever its column names; a task reads the kind
its `Task.data_kind` names (`jaxtune/tasks/<task>.py`):

    kind 'text'    text, [text_pair], label      (sequence-classification)
    kind 'tokens'  tokens (list of words), tags  (token-classification)
    kind 'lm'      text, or prompt + response    (causal-lm)
                   or, rendered with the tokenizer's chat template (`jaxtune.data.chat`):
                   text + spans (character spans of the assistant replies: the loss)
    kind 'image'   image, label                  (image-classification)
    kind 'audio'   audio (path), text            (ctc; decoded and checked by `jaxtune.data.audio`)
    kind 'seq2seq' source, target                (seq2seq-lm; `jaxtune.data.seq2seq`)

`Schema.columns` maps each canonical key to the column (CSV header, JSON key, TFDS feature) that
holds it, as named by the `data.*_column` options. Causal-lm sources may also name columns through
`data.prompt_template` / `data.response_template` placeholders (canonical key `col:NAME`) and a
conversation column (`data.messages_column`, key `messages`); readers turn those into the stored
keys (`Schema.stored`) when they read each row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from jaxtune.data.chat import ChatFormat, TextTemplate
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
    "messages": "messages_column",
    "audio": "audio_column",
    "source": "source_column",
    "target": "target_column",
}
COLUMN = "col:"  # canonical key prefix of a column named by a template placeholder


@dataclass(frozen=True)
class Schema:
    kind: str
    columns: tuple[tuple[str, str], ...]  # (canonical key, source column), required first
    optional: tuple[str, ...] = ()  # canonical keys that may be absent
    label_key: Optional[str] = None  # 'label' or 'tags'; None for causal-lm
    problem_type: Optional[str] = None  # kind 'text' only; None: decided by the labels
    # causal-lm: prompt/response built from columns by templates ((key, template), ...)
    templates: tuple[tuple[str, TextTemplate], ...] = ()
    chat: Optional[ChatFormat] = None  # causal-lm: render rows with this chat template
    audio: Any = None  # kind 'audio': a jaxtune.data.audio.AudioFormat (rate, vocabulary, limits)

    @property
    def stored(self) -> tuple[str, ...]:
        """The keys of the examples as stored (and read back by the pipeline)."""
        if self.kind != "lm":
            return tuple(k for k, _ in self.columns)
        if self.chat is not None:
            return ("text", "spans")
        if self.templates or any(k == "prompt" for k, _ in self.columns):
            return ("prompt", "response")
        return ("text",)

    @property
    def column(self) -> dict[str, str]:
        return dict(self.columns)

    @property
    def text_keys(self) -> tuple[str, ...]:
        """Keys whose values identify an example for de-duplication."""
        if self.kind == "lm":
            return tuple(k for k in self.stored if k != "spans")
        return tuple(k for k, _ in self.columns if k != self.label_key)

    def template_of(self, column: str) -> Optional[TextTemplate]:
        """The template whose placeholder names `column` (None: no template does)."""
        return next((t for _, t in self.templates if column in t.fields), None)


def lm_schema(cfg, tokenizer=None) -> Schema:
    """The causal-lm schema: plain text, prompt/response (columns or templates) or conversations,
    rendered with the tokenizer's chat template when that applies (see `jaxtune.data.chat`)."""
    mode = getattr(cfg, "chat_template", "auto")
    if mode not in ("auto", "none"):
        raise DataError(f"data.chat_template: {mode!r} is not one of auto, none")
    system = getattr(cfg, "system_prompt", None)
    chat = ChatFormat.of(tokenizer, system) if tokenizer is not None and mode == "auto" else None
    messages = getattr(cfg, "messages_column", None)
    if system is not None and (messages or chat is None):
        why = ("conversations carry their own system messages" if messages else
               "data.chat_template is none" if mode == "none" else "the model's tokenizer has no chat template")
        raise DataError(f"data.system_prompt applies to prompt/response pairs rendered as a chat, and {why}")
    sides = {"prompt": (cfg.prompt_column, getattr(cfg, "prompt_template", None)),
             "response": (cfg.response_column, getattr(cfg, "response_template", None))}
    if messages:
        given = [f"data.{k}_{w}" for k, (c, t) in sides.items() for w, v in (("column", c), ("template", t)) if v]
        if given:
            raise DataError(f"data.messages_column holds whole conversations; it does not combine with {', '.join(given)}")
        if chat is None:
            why = ("data.chat_template is none" if mode == "none" else
                   "the model's tokenizer has no chat template" if tokenizer is not None else "no tokenizer was given")
            raise DataError(f"data.messages_column renders conversations with the tokenizer's chat template, and {why}")
        return Schema("lm", (("messages", messages),), chat=chat)
    for k, (c, t) in sides.items():
        if c and t:
            raise DataError(f"data.{k}_column and data.{k}_template both give the {k}; set one")
    if not any(c or t for c, t in sides.values()):
        if system is not None:
            raise DataError("data.system_prompt applies to prompt/response pairs; this recipe reads plain text")
        return Schema("lm", (("text", cfg.text_column),))
    if not all(c or t for c, t in sides.values()):
        raise DataError("causal-lm: set both data.prompt_column and data.response_column, or neither "
                        "(or the matching data.prompt_template / data.response_template)")
    columns, templates = [], []
    for k, (c, t) in sides.items():
        if c:
            columns.append((k, c))
        else:
            tt = TextTemplate.parse(t, f"{k}_template")
            templates.append((k, tt))
            columns += [(COLUMN + f, f) for f in tt.fields]
    columns = list(dict.fromkeys(columns))  # a column in both templates is read once
    return Schema("lm", tuple(columns), templates=tuple(templates), chat=chat)


def make_schema(cfg, task: str, problem_type: Optional[str] = None, tokenizer=None, audio=None) -> Schema:
    """The schema of `task` for the data options `cfg`; causal-lm reads the tokenizer's chat
    template (`lm_schema`); speech (kind 'audio') carries `audio`, its AudioFormat."""
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
        return lm_schema(cfg, tokenizer)
    if kind == "audio":
        return Schema(kind, (("audio", cfg.audio_column), ("text", cfg.text_column)), audio=audio)
    if kind == "seq2seq":
        return Schema(kind, (("source", cfg.source_column), ("target", cfg.target_column)))
    return Schema(kind, (("image", cfg.image_column), ("label", cfg.label_column)), label_key="label")
