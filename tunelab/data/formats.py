"""Dataset formats: turn one row into either a chat (list of messages) or raw text.

Every format normalises to the same two shapes so that templating and label
masking live in one place (``encode.py``). A source may rename a format's fields
to its own column names (``fields: {prompt: question}``) and give chat rows a
system prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tunelab.errors import UserError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")

# The fields each format reads; ``fields`` in a source may map any of them to another column.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
}

# ShareGPT speaker names -> roles (the variants seen in public ShareGPT-style datasets).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bing": "assistant",
}


@dataclass(frozen=True)
class Example:
    """One normalised row: ``messages`` for instruction/chat data, ``text`` for raw text."""

    messages: list[Message] | None = None
    text: str | None = None


@dataclass(frozen=True)
class Row:
    """A raw row seen through a source's field mapping; errors name the real column."""

    data: Mapping[str, Any]
    fmt: str
    where: str
    fields: Mapping[str, str]

    def column(self, name: str) -> str:
        return self.fields.get(name, name)

    def get(self, name: str) -> Any:
        return self.data.get(self.column(name))

    def text(self, name: str) -> str:
        value = self.get(name)
        if not isinstance(value, str):
            problem = "is missing" if value is None else f"is a {type(value).__name__}, not text"
            raise UserError(
                f'{self.where}: field "{self.column(name)}" {problem}, but format "{self.fmt}" needs it; '
                "fix the row, the data format or the source's fields mapping."
            )
        return value


def _text(row: Row) -> Example:
    return Example(text=row.text("text"))


def _prompt_completion(row: Row) -> Example:
    return Example(messages=[{"role": "user", "content": row.text("prompt")}, {"role": "assistant", "content": row.text("completion")}])


def _alpaca(row: Row) -> Example:
    instruction = row.text("instruction")
    extra = row.get("input") or ""
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return Example(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": row.text("output")}])


def _chat(row: Row, role_key: str, content_key: str, role_names: Mapping[str, str]) -> Example:
    name = row.column(FORMAT_FIELDS[row.fmt][0])
    turns = row.get(FORMAT_FIELDS[row.fmt][0])
    if not isinstance(turns, list) or not turns:
        raise UserError(f'{row.where}: field "{name}" must be a non-empty list of {{{role_key}, {content_key}}}; fix the row.')
    messages = []
    for turn, message in enumerate(turns):
        speaker = message.get(role_key) if isinstance(message, Mapping) else None
        content = message.get(content_key) if isinstance(message, Mapping) else None
        role = role_names.get(speaker) if isinstance(speaker, str) else None
        if role is None or not isinstance(content, str):
            raise UserError(
                f"{row.where}: message {turn} needs a {role_key} in {', '.join(role_names)} and text {content_key}, "
                f"got {message!r}; fix the row."
            )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{row.where}: the conversation has no assistant message, so nothing would be trained; fix the row.")
    return Example(messages=messages)


def _messages(row: Row) -> Example:
    return _chat(row, "role", "content", {role: role for role in ROLES})


def _sharegpt(row: Row) -> Example:
    return _chat(row, "from", "value", SHAREGPT_ROLES)


FORMATS: dict[str, Callable[[Row], Example]] = {
    "text": _text,
    "prompt_completion": _prompt_completion,
    "alpaca": _alpaca,
    "messages": _messages,
    "sharegpt": _sharegpt,
}


def to_example(
    row: Mapping[str, Any],
    fmt: str,
    where: str,
    fields: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> Example:
    """Normalise ``row`` of format ``fmt``; ``where`` names the row in error messages."""
    example = FORMATS[fmt](Row(row, fmt, where, fields or {}))
    if system_prompt is not None and example.messages and example.messages[0]["role"] != "system":
        example = Example(messages=[{"role": "system", "content": system_prompt}, *example.messages])
    return example
