"""Chat and instruction data for causal-lm: conversations rendered with the tokenizer's chat
template, and prompt/response text built from any columns with `str.format`-style templates.

A conversation is a list of `{"role": ..., "content": ...}` messages (`data.messages_column`; in
CSV/TSV a JSON string of that list). `ChatFormat.render` renders it with the tokenizer's chat
template (`tokenizer.apply_chat_template`) and returns the text and the character spans that carry
the loss: each assistant reply. No `{% generation %}` markers are needed: for assistant message i
the conversation up to i is rendered with the generation prompt (the *prefix*) and up to and
including i (the *through* render); the reply is what lies between. Every such render must be the
start of the next one and of the whole conversation (the template is *prefix-stable*), else the
row is refused with that reason.

What is in the loss for a reply: from the end of the generation prompt through the first special
token after the reply's text (the template's end-of-turn marker: `<|im_end|>`, `<|eot_id|>`,
`</s>`, ...), so the model learns to stop; what the template adds after that marker (ChatML's
line break) is context only. A template with no special token after the reply: the whole through
render's tail. `TextEncoder` maps the spans to tokens with the fast tokenizer's offsets
(`jaxtune.data.text.token_labels`): a token is a target when its characters overlap a span.

Prompt/response pairs (`data.prompt_column` / `data.response_column`, or `data.prompt_template` /
`data.response_template`) become the one-turn conversation [user: prompt, assistant: response]
when the tokenizer has a chat template and `data.chat_template` is `auto`.

Rendering happens when local files are converted (`jaxtune.data.local`), so a row the template
cannot render stops the run before training with its file and line, and the cache key (the
schema's repr) holds the chat template text, the special tokens and the text templates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from string import Formatter
from typing import Any, Optional

from jaxtune.errors import DataError

ASSISTANT = "assistant"


class RowError(Exception):
    """A row that cannot be used; the message has no file or line (the reader adds them)."""


# ---------------------------------------------------------------------------------------------
# Text templates: "Sentiment of this tweet?\n{text}" filled from a row's columns


@dataclass(frozen=True)
class TextTemplate:
    """A `str.format`-style template whose `{placeholders}` name columns (any name without
    `{}:!`, taken literally: `{a.b}` is the column 'a.b'). `{{` and `}}` are braces.

    >>> t = TextTemplate.parse("Sentiment of: {text} ({lang})", "prompt_template")
    >>> t.fields
    ('text', 'lang')
    >>> t.fill({"text": "so good", "lang": "en"})
    'Sentiment of: so good (en)'
    """

    text: str
    option: str  # the recipe key it came from, for messages
    fields: tuple[str, ...] = ()
    parts: tuple[tuple[str, Optional[str], str, Optional[str]], ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def parse(cls, text: str, option: str) -> "TextTemplate":
        try:
            parts = tuple(Formatter().parse(text))
        except ValueError as e:
            raise DataError(f"data.{option}: {e} in {_short(text)}") from None
        fields = [f for _, f, _, _ in parts if f is not None]
        if "" in fields or any(f.isdigit() for f in fields):
            raise DataError(f"data.{option}: every {{}} needs a column name, e.g. {{text}}, in {_short(text)}")
        if not fields:
            raise DataError(f"data.{option}: {_short(text)} names no column; use {{column}} placeholders")
        return cls(text, option, tuple(dict.fromkeys(fields)), parts)

    def fill(self, values: dict[str, str]) -> str:
        out = []
        for literal, name, spec, conv in self.parts:
            out.append(literal)
            if name is not None:
                v: Any = values[name]
                if conv:
                    v = {"r": repr, "s": str, "a": ascii}[conv](v)
                try:
                    out.append(format(v, spec or ""))
                except (ValueError, TypeError) as e:
                    raise RowError(f"data.{self.option}: {{{name}:{spec}}}: {e}") from None
        return "".join(out)


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


# ---------------------------------------------------------------------------------------------
# Conversations


def parse_messages(value) -> list[dict]:
    """A row's conversation, checked: a non-empty list of {role, content} objects with string
    role and content and at least one assistant message (a JSON string of it is parsed first)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"messages are not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, list):
        raise RowError(f"expected a list of {{role, content}} messages, found {type(value).__name__}")
    if not value:
        raise RowError("an empty conversation (no messages)")
    out = []
    for n, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise RowError(f"message {n} is {type(m).__name__}, not a {{role, content}} object")
        for key in ("role", "content"):
            if key not in m:
                raise RowError(f"message {n} has no '{key}' (keys: {', '.join(map(str, m)) or 'none'})")
        role = m["role"]
        if not isinstance(role, str) or not role.strip():
            raise RowError(f"message {n}: role {role!r} is not a non-empty string")
        if not isinstance(m["content"], str):
            raise RowError(f"message {n} ({role}): content is {type(m['content']).__name__}, not a string")
        out.append(dict(m))
    if not any(m["role"] == ASSISTANT for m in out):
        raise RowError(f"no '{ASSISTANT}' message (roles: {', '.join(dict.fromkeys(m['role'] for m in out))}); "
                       "nothing to learn")
    return out


@dataclass(frozen=True)
class ChatFormat:
    """The tokenizer's chat template, as used to render training rows. Its repr (template text,
    special tokens) is part of the data cache key; the tokenizer itself is not compared."""

    template: str
    special_tokens: tuple[tuple[str, str], ...]  # the tokenizer's special tokens (bos_token, ...)
    markers: tuple[str, ...]  # special token texts; the first after a reply ends its loss span
    tokenizer: Any = field(default=None, repr=False, compare=False)
    system: Optional[str] = None  # a system message before each one-turn prompt (data.system_prompt)

    @classmethod
    def of(cls, tokenizer, system: Optional[str] = None) -> Optional["ChatFormat"]:
        """The tokenizer's chat format, None when it has no chat template."""
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            return None
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default") or next(iter(template.values()))
        specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
        markers = {str(t) for t in tokenizer.all_special_tokens}
        markers |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        return cls(str(template), tuple(sorted(specials.items())), tuple(sorted(markers, key=lambda t: (-len(t), t))),
                   tokenizer, system)

    def one_turn(self, prompt: str, response: Optional[str] = None) -> list[dict]:
        """[system,] user prompt[, assistant response] as messages."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + (one_turn(prompt, response) if response is not None else [{"role": "user", "content": prompt}])

    def apply(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            out = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja's TemplateError (raise_exception), UndefinedError, TypeError
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RowError(f"the chat template cannot render this conversation: {first}") from None
        if not isinstance(out, str):
            raise RowError(f"the chat template rendered {type(out).__name__}, not text")
        return out

    def render(self, messages: list[dict]) -> tuple[str, list[int]]:
        """(text, spans): the whole conversation and [start, end, start, end, ...] character spans
        of the assistant replies in it (see the module docstring)."""
        full = self.apply(messages, False)
        spans: list[int] = []
        last = len(messages) - 1
        for i, m in enumerate(messages):
            if m["role"] != ASSISTANT:
                continue
            prefix = self.apply(messages[:i], True) if i else self._empty_prefix()
            through = full if i == last else self.apply(messages[: i + 1], False)
            if not through.startswith(prefix) or not full.startswith(through):
                raise RowError(
                    f"the chat template is not prefix-stable at assistant message {i + 1}: rendering the "
                    "conversation up to it (with the generation prompt, then with the reply) does not give "
                    "the start of the whole conversation's rendering, so the reply's tokens cannot be found"
                )
            start, tail = len(prefix), through[len(prefix):]
            spans += [start, start + self._reply_end(tail, m["content"])]
        return full, spans

    def _empty_prefix(self) -> str:
        try:
            return self.apply([], True)
        except RowError:  # a template that needs a message first: nothing precedes the reply
            return ""

    def _reply_end(self, tail: str, content: str) -> int:
        """Where the loss of a reply rendered as `tail` stops: after the first special token that
        follows the reply's text (its end-of-turn marker), else the end of `tail`."""
        text = content.strip()
        at = tail.find(text) + len(text) if text and text in tail else 0
        ends = [(tail.find(t, at), t) for t in self.markers if t]
        ends = [(i, t) for i, t in ends if i >= 0]
        if not ends:
            return len(tail)
        i, t = min(ends, key=lambda e: (e[0], -len(e[1])))
        return i + len(t)

    def prompt(self, text: str) -> str:
        """A one-turn user prompt with the generation prompt (what `jaxtune predict` feeds)."""
        try:
            return self.apply(self.one_turn(text), True)
        except RowError as e:
            raise DataError(str(e)) from None


def one_turn(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": ASSISTANT, "content": response}]


__all__ = ["ASSISTANT", "ChatFormat", "RowError", "TextTemplate", "one_turn", "parse_messages"]
