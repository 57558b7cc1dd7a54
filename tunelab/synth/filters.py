"""Rule-based filters: length bounds, refusals, and an answer-format check.

Each rule returns the reason it drops a candidate, or None; the reasons are the keys of the
report's ``dropped`` counts, so a user sees which rule removed how much.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from tunelab.synth.candidate import Candidate
from tunelab.synth.config import FilterConfig


def _length(c: Candidate, f: FilterConfig) -> str | None:
    if not f.min_prompt_chars <= len(c.prompt) <= f.max_prompt_chars:
        return "prompt_length"
    if not f.min_answer_chars <= len(c.answer) <= f.max_answer_chars:
        return "answer_length"
    return None


def _refusal(c: Candidate, f: FilterConfig) -> str | None:
    answer = c.answer.lower()
    return "refusal" if any(phrase.lower() in answer for phrase in f.refusals) else None


def _answer_format(c: Candidate, f: FilterConfig) -> str | None:
    if f.answer_pattern is None:
        return None
    return None if re.fullmatch(f.answer_pattern, c.answer.strip(), flags=re.DOTALL) else "answer_format"


# Most specific first: a refusal is reported as a refusal even though it is also malformed and long.
RULES: list[Callable[[Candidate, FilterConfig], str | None]] = [_refusal, _answer_format, _length]


def apply_rules(candidates: list[Candidate], config: FilterConfig) -> None:
    """Mark each candidate with the first rule that drops it (in the order of ``RULES``)."""
    for candidate in candidates:
        if candidate.dropped is None:
            candidate.dropped = next((reason for rule in RULES if (reason := rule(candidate, config))), None)
