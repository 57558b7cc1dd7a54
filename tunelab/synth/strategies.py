"""Generation strategies, selected by ``strategy.name``; each owns its options model.

A strategy turns seed examples into candidates (prompt, answer, provenance) using the
``Generator``; candidates that fail a rule of the strategy's own paper are returned already
marked with the reason, so the report counts them. Adding a strategy = one class here with
``@strategy``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from tunelab.synth import prompts
from tunelab.synth.candidate import Candidate
from tunelab.synth.config import StrategyOptions
from tunelab.synth.dedup import NearDuplicateIndex
from tunelab.synth.journal import Generator

STRATEGIES: dict[str, type[Strategy]] = {}


def strategy(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Seed:
    id: int  # row number in the seed file
    prompt: str
    answer: str


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class Strategy:
    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]]

    def __init__(self, options: StrategyOptions, seed: int, near: NearDuplicateIndex | None):
        self.options, self.rng, self.near = options, random.Random(seed), near

    def run(self, seeds: list[Seed], generate: Generator) -> list[Candidate]:
        raise NotImplementedError

    def answer(self, generate: Generator, phase: str, candidates: list[Candidate]) -> None:
        """Fill in the teacher's answer of every candidate still in the running."""
        live = [c for c in candidates if c.dropped is None]
        for candidate, reply in zip(live, generate(phase, [user(c.prompt) for c in live]), strict=True):
            candidate.answer = reply


class AnswerOptions(StrategyOptions):
    name: Literal["answer"] = "answer"


@strategy
class Answer(Strategy):
    """The teacher answers the seed prompts as they are: the plain sequence-level distillation set."""

    name = "answer"
    Options = AnswerOptions

    def run(self, seeds, generate):
        candidates = [Candidate(s.prompt, "", self.name, 0, [s.id]) for s in seeds]
        self.answer(generate, "answer", candidates)
        return candidates


class SelfInstructOptions(StrategyOptions):
    name: Literal["self_instruct"] = "self_instruct"
    rounds: Annotated[int, Field(ge=1)] = 1
    instructions_per_round: Annotated[int, Field(ge=1)] = 16
    demos: Annotated[int, Field(ge=1)] = 8  # in-context tasks per request (the paper: 6 human + 2 generated)
    generated_demos: Annotated[int, Field(ge=0)] = 2
    min_words: Annotated[int, Field(ge=1)] = 3
    max_words: Annotated[int, Field(ge=1)] = 150
    # Tasks a text model cannot do (the paper's list); instructions naming them are dropped.
    banned_words: list[str] = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
                               "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]


@strategy
class SelfInstruct(Strategy):
    """New instructions from the pool's examples, filtered as in the paper, then answered."""

    name = "self_instruct"
    Options = SelfInstructOptions
    options: SelfInstructOptions

    def run(self, seeds, generate):
        o, pool, made = self.options, [(s.prompt, [s.id]) for s in seeds], []
        for seed in seeds:  # new instructions must not repeat the pool (the paper: ROUGE-L < 0.7; here MinHash)
            self._is_repeat(seed.prompt)
        out: list[Candidate] = []
        for round_ in range(1, o.rounds + 1):
            requests, sources = [], []
            for _ in range(o.instructions_per_round):
                n_generated = min(o.generated_demos, len(made))
                demos = self.rng.sample(made, n_generated) + self.rng.sample(pool, min(o.demos - n_generated, len(pool)))
                examples = "".join(f"Task {i + 1}: {text}\n" for i, (text, _) in enumerate(demos))
                requests.append(user(prompts.SELF_INSTRUCT.format(examples=examples, next=len(demos) + 1)))
                sources.append(sorted({i for _, ids in demos for i in ids}))
            replies = generate(f"self_instruct/round{round_}/instructions", requests)
            batch = [Candidate(self._first_task(r), "", self.name, round_, ids) for r, ids in zip(replies, sources, strict=True)]
            for c in batch:
                c.dropped = self._instruction_problem(c.prompt)
            self.answer(generate, f"self_instruct/round{round_}/answers", batch)
            made += [(c.prompt, c.seed_ids) for c in batch if c.dropped is None]
            out += batch
        return out

    @staticmethod
    def _first_task(reply: str) -> str:
        line = next((line for line in reply.splitlines() if line.strip()), "")
        return re.sub(r"^\s*Task\s*\d+\s*[:.]\s*", "", line).strip()

    def _instruction_problem(self, text: str) -> str | None:
        o, words = self.options, text.split()
        if not o.min_words <= len(words) <= o.max_words:
            return "self_instruct_length"
        lowered = f" {text.lower()} "
        if any(re.search(rf"\b{re.escape(w)}\b", lowered) for w in o.banned_words):
            return "self_instruct_unsupported_task"
        if not text[0].isalnum() or not text[0].isascii():
            return "self_instruct_bad_start"
        if self._is_repeat(text):
            return "self_instruct_similar"
        return None

    def _is_repeat(self, text: str) -> bool:
        if self.near is None:
            return False
        duplicate, signature = self.near.find(text)
        if not duplicate:
            self.near.add(signature)
        return duplicate


EVOL_OPS = tuple(prompts.IN_DEPTH) + ("breadth",)
STOP_WORDS = frozenset("a an the and or but if of to in on at for with by from as is are was were be been it this that "
                       "these those i you he she we they me my your our their its not no so do does did".split())


class EvolOptions(StrategyOptions):
    name: Literal["evol_instruct"] = "evol_instruct"
    rounds: Annotated[int, Field(ge=1)] = 4  # the paper evolves for M = 4 rounds
    # Drawn uniformly per instruction and round: the in-depth operations and the in-breadth one.
    ops: Annotated[list[Literal[EVOL_OPS]], Field(min_length=1)] = list(EVOL_OPS)  # type: ignore[valid-type]
    refusal_max_words: Annotated[int, Field(ge=1)] = 80  # "sorry" in a reply shorter than this = failed evolution


@strategy
class EvolInstruct(Strategy):
    """Evolve every instruction for K rounds; the paper's elimination rules drop failed evolutions.

    A failed evolution leaves the instruction as it was for the next round (the paper returns it
    to the pool); a successful one replaces it and becomes a candidate of its round.
    """

    name = "evol_instruct"
    Options = EvolOptions
    options: EvolOptions

    def run(self, seeds, generate):
        pool = [(s.prompt, s.id) for s in seeds]
        out: list[Candidate] = []
        for round_ in range(1, self.options.rounds + 1):
            ops = [self.rng.choice(self.options.ops) for _ in pool]
            requests = [user((prompts.IN_BREADTH if op == "breadth" else prompts.IN_DEPTH[op]).format(instruction=text))
                        for (text, _), op in zip(pool, ops, strict=True)]
            replies = generate(f"evol_instruct/round{round_}/evolve", requests)
            batch = []
            for (original, seed_id), op, reply in zip(pool, ops, replies, strict=True):
                candidate = Candidate(self._strip(reply), "", self.name, round_, [seed_id], op=op)
                candidate.dropped = self._instruction_problem(candidate.prompt, original)
                batch.append(candidate)
            self.answer(generate, f"evol_instruct/round{round_}/answers", batch)
            for candidate in batch:
                if candidate.dropped is None:
                    candidate.dropped = self._response_problem(candidate.answer)
            pool = [(c.prompt, c.seed_ids[0]) if c.dropped is None else item for c, item in zip(batch, pool, strict=True)]
            out += batch
        return out

    @staticmethod
    def _strip(reply: str) -> str:
        return re.sub(r"^\s*#?(Rewritten|Created) Prompt#?\s*:?\s*", "", reply, flags=re.IGNORECASE).strip()

    @staticmethod
    def _instruction_problem(evolved: str, original: str) -> str | None:
        if any(words in evolved.lower() for words in prompts.TEMPLATE_WORDS):
            return "evol_copied_prompt"
        # No information gain: the evolved instruction adds no word the original lacks (the paper asks ChatGPT).
        if not set(re.findall(r"\w+", evolved.lower())) - set(re.findall(r"\w+", original.lower())):
            return "evol_no_new_information"
        return None

    def _response_problem(self, answer: str) -> str | None:
        words = re.findall(r"\w+", answer.lower())
        if "sorry" in words and len(answer.split()) < self.options.refusal_max_words:
            return "evol_response_sorry"
        if all(word in STOP_WORDS for word in words):  # only punctuation and stop words (or nothing)
            return "evol_response_degenerate"
        return None


class RationaleOptions(StrategyOptions):
    name: Literal["rationale"] = "rationale"
    marker: str = "Answer:"
    # Worked examples shown before each question: {question, rationale, answer}.
    demos: list[dict[str, str]] = []
    # Keep only rationales whose answer equals the seed's answer (the seed's label is the truth).
    require_seed_answer: bool = False


@strategy
class Rationale(Strategy):
    """The teacher reasons step by step, then answers; rationale and answer are stored apart."""

    name = "rationale"
    Options = RationaleOptions
    options: RationaleOptions

    def run(self, seeds, generate):
        o = self.options
        demos = "".join(f"Question: {d['question']}\n{d['rationale']}\n{o.marker} {d['answer']}\n\n" for d in o.demos)
        requests = [user(prompts.RATIONALE.format(demos=demos, question=s.prompt, marker=o.marker)) for s in seeds]
        out = []
        for seed, reply in zip(seeds, generate("rationale", requests), strict=True):
            candidate = Candidate(seed.prompt, "", self.name, 0, [seed.id])
            head, found, tail = reply.rpartition(o.marker)
            answer = (tail.strip().splitlines() or [""])[0].strip()  # the marker's line; text after it is not the answer
            if not found or not answer:
                candidate.answer, candidate.dropped = reply, "rationale_no_answer"
            else:
                candidate.rationale, candidate.answer = head.strip(), answer
                if o.require_seed_answer and candidate.answer != seed.answer.strip():
                    candidate.dropped = "rationale_wrong_answer"
            out.append(candidate)
        return out
