"""``tunelab synth``: seeds → strategy → rule filters → deduplication → critic → dataset + report.

Output folder::

    data.jsonl     kept rows in output.format, each with its provenance
    dropped.jsonl  the other candidates, each with the reason it was dropped (to audit the checks)
    report.json    generated, kept, dropped per reason, teacher and judge calls (new / reused)
    config.yaml    the resolved config
    work/generations.jsonl   the journal of every batch the teacher answered (what a rerun reuses)

The checks run from cheap to expensive (rules, exact duplicates, near-duplicates, the judge), and
each candidate is counted under the first check that drops it, so kept + dropped = generated.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import yaml

from tunelab.data.formats import to_example
from tunelab.data.sources import load_source
from tunelab.errors import UserError
from tunelab.io import atomic_write_text
from tunelab.synth.backend import Backend, Sampling, make_backend
from tunelab.synth.candidate import Candidate
from tunelab.synth.config import SynthConfig
from tunelab.synth.critic import judge
from tunelab.synth.dedup import NearDuplicateIndex, drop_duplicates
from tunelab.synth.filters import apply_rules
from tunelab.synth.journal import Generator, Journal
from tunelab.synth.strategies import STRATEGIES, Seed


def load_seeds(config: SynthConfig) -> list[Seed]:
    """Seed rows as (prompt, answer): the last user turn before the last assistant turn, and that turn."""
    seeds = []
    for number, row in enumerate(load_source(config.seeds, "seeds")):
        example = to_example(row, config.seeds.format, f'seeds "{config.seeds.path}" row {number}', config.seeds.fields)
        messages = example.messages or []
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), None)
        if prompt is None:
            raise UserError(f'seeds "{config.seeds.path}" row {number} has no user message; every seed needs a prompt.')
        seeds.append(Seed(number, prompt, messages[last]["content"]))
    return seeds


def _near_index(config: SynthConfig) -> NearDuplicateIndex | None:
    d = config.dedup
    return NearDuplicateIndex(d.ngram, d.threshold, d.num_perm, d.bands) if d.near else None


def to_row(candidate: Candidate, config: SynthConfig, teacher: str) -> dict:
    completion = candidate.answer
    if config.output.target == "rationale_and_answer" and candidate.rationale:
        completion = f"{candidate.rationale}\n{config.strategy.marker} {candidate.answer}"
    if config.output.format == "alpaca":
        row = {"instruction": candidate.prompt, "input": "", "output": completion}
    elif config.output.format == "messages":
        row = {"messages": [{"role": "user", "content": candidate.prompt}, {"role": "assistant", "content": completion}]}
    else:
        row = {"prompt": candidate.prompt, "completion": completion}
    if candidate.rationale is not None:
        row |= {"rationale": candidate.rationale, "answer": candidate.answer}
    row["provenance"] = {
        "teacher": teacher, "strategy": candidate.strategy, "round": candidate.round, "seed_ids": candidate.seed_ids,
        "op": candidate.op, "critic": (config.critic.model or teacher) if config.critic else None,
        "critic_score": candidate.critic_score,
    }
    return row


def synthesize(config: SynthConfig, output_dir: str | Path, backend: Backend | None = None,
               critic_backend: Backend | None = None) -> dict:
    """Run the stage into ``output_dir``; returns the report. ``backend`` replaces loading the teacher (tests)."""
    started = time.perf_counter()
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} is a file; choose another --output.")
    seeds = load_seeds(config)
    backend = backend or make_backend(config.teacher.path, config.teacher.dtype, config.teacher.backend, "teacher",
                                    config.teacher.train)
    g = config.generation
    journal = Journal(out / "work" / "generations.jsonl")
    generate = Generator(backend, Sampling(g.max_new_tokens, g.temperature, g.top_p, g.top_k, g.repetition_penalty),
                         g.batch_size, config.seed, journal)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

    strategy = STRATEGIES[config.strategy.name](config.strategy, config.seed, _near_index(config))
    candidates = strategy.run(seeds, generate)
    apply_rules(candidates, config.filters)
    drop_duplicates(candidates, config.dedup.exact, _near_index(config))
    judged = None
    if config.critic is not None:
        if critic_backend is None and config.critic.model is not None:
            critic_backend = make_backend(config.critic.model, config.critic.dtype, "auto", "critic.model")
        judged = Generator(critic_backend or backend, Sampling(config.critic.max_new_tokens, 0.0), g.batch_size,
                           config.seed, journal)
        judge(candidates, config.critic, judged)

    kept = [c for c in candidates if c.dropped is None]
    lines = "".join(json.dumps(to_row(c, config, backend.name), ensure_ascii=False) + "\n" for c in kept)
    atomic_write_text(out / "data.jsonl", lines)
    dropped = [{**to_row(c, config, backend.name), "dropped": c.dropped} for c in candidates if c.dropped]
    atomic_write_text(out / "dropped.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in dropped))
    calls = [generate] + ([judged] if judged else [])
    report = {
        "generated": len(candidates),
        "kept": len(kept),
        "dropped": dict(sorted(Counter(c.dropped for c in candidates if c.dropped).items())),
        "teacher": backend.name,
        "strategy": config.strategy.name,
        "seeds": len(seeds),
        "teacher_calls": {"new": sum(c.generated for c in calls), "reused": sum(c.reused for c in calls)},
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict, out: Path) -> str:
    dropped = ", ".join(f"{reason} {n}" for reason, n in report["dropped"].items()) or "none"
    calls = report["teacher_calls"]
    return (f"tunelab: synth ({report['strategy']}, teacher {report['teacher']}): generated {report['generated']}, "
            f"kept {report['kept']}, dropped: {dropped}\n"
            f"tunelab: {calls['new']} replies generated, {calls['reused']} reused from an earlier run; "
            f"data in {out / 'data.jsonl'}, report in {out / 'report.json'}")
