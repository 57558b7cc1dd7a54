"""One generated example on its way through the quality checks, with where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Candidate:
    prompt: str
    answer: str
    strategy: str
    round: int
    seed_ids: list[int]
    rationale: str | None = None
    op: str | None = None  # Evol-Instruct: the evolution that made the prompt
    critic_score: float | None = None
    dropped: str | None = None  # the reason, once a check drops it
    extra: dict = field(default_factory=dict)
