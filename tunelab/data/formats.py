"""Dataset formats: turn one row into either a chat (list of messages) or raw text.

Every format normalises to the same two shapes so that templating and label
masking live in one place (``encode.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tunelab.errors import UserError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One normalised row: ``messages`` for instruction/chat data, ``text`` for raw text."""

    messages: list[Message] | None = None
    text: str | None = None


def _field(row: Mapping[str, Any], name: str, fmt: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"is a {type(value).__name__}, not text"
        raise UserError(f'{where}: field "{name}" {problem}, but format "{fmt}" needs it; fix the row or the data format.')
    return value


def _text(row: Mapping[str, Any], where: str) -> Example:
    return Example(text=_field(row, "text", "text", where))


def _prompt_completion(row: Mapping[str, Any], where: str) -> Example:
    return Example(
        messages=[
            {"role": "user", "content": _field(row, "prompt", "prompt_completion", where)},
            {"role": "assistant", "content": _field(row, "completion", "prompt_completion", where)},
        ]
    )


def _alpaca(row: Mapping[str, Any], where: str) -> Example:
    instruction = _field(row, "instruction", "alpaca", where)
    extra = row.get("input") or ""
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return Example(
        messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": _field(row, "output", "alpaca", where)}]
    )


def _messages(row: Mapping[str, Any], where: str) -> Example:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{where}: field "messages" must be a non-empty list of {{role, content}}; fix the row.')
    out = []
    for turn, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if role not in ROLES or not isinstance(content, str):
            raise UserError(
                f"{where}: message {turn} needs a role in {', '.join(ROLES)} and text content, got {message!r}; fix the row."
            )
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant message, so nothing would be trained; fix the row.")
    return Example(messages=out)


FORMATS: dict[str, Callable[[Mapping[str, Any], str], Example]] = {
    "text": _text,
    "prompt_completion": _prompt_completion,
    "alpaca": _alpaca,
    "messages": _messages,
}


def to_example(row: Mapping[str, Any], fmt: str, where: str) -> Example:
    """Normalise ``row`` of format ``fmt``; ``where`` names the row in error messages."""
    return FORMATS[fmt](row, where)
