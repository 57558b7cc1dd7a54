"""A model as judge: it scores each candidate with the config's prompt; below the threshold is dropped.

The judge's reply is read for its first number, so any chat model can judge; a reply without one
is dropped (``critic_unparsed``) unless ``critic.on_unparsed: keep``. Judging is greedy and goes
through the same journal as generation, so a resumed run does not ask the judge twice.
"""

from __future__ import annotations

import re

from tunelab.synth.candidate import Candidate
from tunelab.synth.config import CriticConfig
from tunelab.synth.journal import Generator
from tunelab.synth.strategies import user

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(reply: str) -> float | None:
    match = _NUMBER.search(reply)
    return float(match.group()) if match else None


def judge(candidates: list[Candidate], config: CriticConfig, generate: Generator) -> None:
    live = [c for c in candidates if c.dropped is None]
    requests = [user(config.prompt.format(prompt=c.prompt, answer=c.answer)) for c in live]
    for candidate, reply in zip(live, generate("critic", requests), strict=True):
        candidate.critic_score = parse_score(reply)
        if candidate.critic_score is None:
            candidate.dropped = "critic_unparsed" if config.on_unparsed == "drop" else None
        elif candidate.critic_score < config.threshold:
            candidate.dropped = "critic_below_threshold"
