"""tunelab synth: a trained tiny teacher writes a dataset; filters, dedup and the critic drop what they should.

The teacher is the built-in tiny Llama fully fine-tuned on the quickstart task for 150 steps
(trained once per test session). Planted replies (refusals, malformed and over-long answers,
exact and near duplicates) go through the real pipeline by wrapping the teacher's backend.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from recipe_helpers import REPO

from tunelab.synth.config import SynthConfig
from tunelab.synth.dedup import MinHasher, shingles, similarity
from tunelab.synth.run import synthesize
from tunelab.synth.strategies import Seed

_TEACHER: dict[str, Path] = {}


def trained_teacher(tmp_path_factory) -> Path:
    """The quickstart task's teacher: tiny Llama, full fine-tuning, 150 steps (once per session)."""
    if "run" not in _TEACHER:
        from tunelab.config import load_config
        from tunelab.train.run import train

        out = tmp_path_factory.mktemp("teacher") / "run"
        with contextlib.chdir(REPO):
            config = load_config("configs/tiny/full.yaml", ["training.max_steps=150", "training.learning_rate=3.0e-3",
                                                            "eval.before_training=false", "eval.exact_match=false"])
            train(config, output_dir=out)
        _TEACHER["run"] = out
    return _TEACHER["run"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return trained_teacher(tmp_path_factory)


def quickstart_rows(n: int, start: int = 0) -> list[dict]:
    lines = (REPO / "configs/data/quickstart/train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[start : start + n]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def synth_config(teacher: Path, seeds: Path, **sections) -> SynthConfig:
    raw = {
        "teacher": {"path": str(teacher), "dtype": "float32", "backend": "transformers"},
        "seeds": {"path": str(seeds), "format": "prompt_completion"},
        "strategy": "answer",
        "generation": {"batch_size": 8, "max_new_tokens": 6, "temperature": 0.0},
        "filters": {"answer_pattern": r"\d+", "max_answer_chars": 5},
        **sections,
    }
    return SynthConfig.model_validate(raw)


class Planted:
    """The teacher's backend with fixed replies for some prompts (and a count of what it generated)."""

    def __init__(self, backend, replies: dict[str, str] | None = None, fail_after: int | None = None):
        self.inner, self.replies, self.fail_after = backend, replies or {}, fail_after
        self.name, self.calls, self.prompts = backend.name, 0, 0

    def generate(self, conversations, sampling, seed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        self.calls += 1
        self.prompts += len(conversations)
        real = self.inner.generate(conversations, sampling, seed)
        return [self.replies.get(c[-1]["content"], r) for c, r in zip(conversations, real, strict=True)]


def teacher_backend(teacher: Path):
    from tunelab.synth.backend import make_backend

    if "backend" not in _TEACHER:
        _TEACHER["backend"] = make_backend(str(teacher), "float32", "transformers", "teacher")
    return _TEACHER["backend"]


def test_planted_rows_are_dropped_by_the_right_check_and_rows_carry_provenance(teacher, tmp_path):
    real = quickstart_rows(40)
    p = [r["prompt"] for r in real]
    planted = {
        p[0]: "I'm sorry, but I cannot help with that.", p[1]: "As an AI, I cannot count.", p[2]: "I am unable to say.",
        p[3]: "forty-two", p[4]: "the answer", p[5]: "12a",
        p[6]: "123456789",  # longer than filters.max_answer_chars
        p[7]: "128", "So, " + p[7]: "128",  # a near-duplicate: same question with two more words, same answer
        p[8]: "51", "Well, " + p[8]: "51",
    }
    seeds = real + [real[10], real[11], {"prompt": "So, " + p[7], "completion": ""},
                    {"prompt": "Well, " + p[8], "completion": ""}]
    config = synth_config(teacher, write_jsonl(tmp_path / "seeds.jsonl", seeds))
    report = synthesize(config, tmp_path / "out", backend=Planted(teacher_backend(teacher), planted))

    dropped = report["dropped"]
    assert dropped["refusal"] == 3
    assert dropped["answer_length"] == 1
    assert dropped["duplicate_exact"] == 2  # rows 10 and 11 appear twice; greedy replies are equal
    assert dropped["duplicate_near"] == 2
    assert dropped.get("answer_format", 0) >= 3  # the planted three, plus any malformed real reply
    assert report["generated"] == len(seeds) == report["kept"] + sum(dropped.values())
    # The teacher knows the task: its own replies are numbers and pass the format check.
    assert dropped["answer_format"] - 3 <= 2
    why = {r["prompt"]: r["dropped"] for r in map(json.loads, (tmp_path / "out/dropped.jsonl").read_text().splitlines())}
    assert [why.get(p[i]) for i in range(7)] == ["refusal"] * 3 + ["answer_format"] * 3 + ["answer_length"]
    assert why["So, " + p[7]] == why["Well, " + p[8]] == "duplicate_near"
    rows = [json.loads(line) for line in (tmp_path / "out/data.jsonl").read_text().splitlines()]
    kept_prompts = {r["prompt"] for r in rows}
    assert not kept_prompts & {p[i] for i in range(7)} and "So, " + p[7] not in kept_prompts
    assert p[7] in kept_prompts and len(kept_prompts) == len(rows)
    first = rows[0]
    assert set(first) == {"prompt", "completion", "provenance"}
    assert first["provenance"] == {"teacher": str(teacher), "strategy": "answer", "round": 0,
                                   "seed_ids": [seeds.index(next(s for s in seeds if s["prompt"] == first["prompt"]))],
                                   "op": None, "critic": None, "critic_score": None}
    # What the teacher wrote for a real question is the task's answer most of the time.
    own = [r for r in rows if r["prompt"] not in planted]
    right = sum(r["completion"] == str(int(r["prompt"].rsplit(",", 1)[1].rstrip("?")) + 1) for r in own)
    assert right >= 0.5 * len(own)


class Judge:
    """A judge model stand-in: 9 for a right answer to the counting question, 2 for a wrong one."""

    name = "judge"

    def generate(self, conversations, sampling, seed):
        replies = []
        for conversation in conversations:
            text = conversation[-1]["content"]
            question = text.split("Question: ")[1].split("\n")[0]
            answer = text.split("Answer: ")[1].strip()
            expected = str(int(question.rsplit(",", 1)[1].rstrip("?")) + 1)
            replies.append("9" if answer == expected else "Score: 2")
        return replies


def test_critic_drops_answers_below_its_threshold(teacher, tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", quickstart_rows(16))
    wrong = {r["prompt"]: "7" for r in quickstart_rows(4)}
    config = synth_config(teacher, seeds, critic={"model": "judge", "threshold": 5})
    report = synthesize(config, tmp_path / "judged", backend=Planted(teacher_backend(teacher), wrong), critic_backend=Judge())
    assert report["dropped"]["critic_below_threshold"] >= 4
    rows = [json.loads(line) for line in (tmp_path / "judged/data.jsonl").read_text().splitlines()]
    assert rows and all(r["provenance"]["critic_score"] == 9.0 and r["provenance"]["critic"] == "judge" for r in rows)
    assert report["kept"] + sum(report["dropped"].values()) == 16

    # The teacher itself as judge (critic.model null): every candidate gets a score or an unparsed drop.
    config = synth_config(teacher, seeds, critic={"threshold": 0, "on_unparsed": "drop"})
    report = synthesize(config, tmp_path / "self-judged", backend=teacher_backend(teacher))
    rows = [json.loads(line) for line in (tmp_path / "self-judged/data.jsonl").read_text().splitlines()]
    assert all(r["provenance"]["critic_score"] is not None for r in rows)
    assert report["kept"] + sum(report["dropped"].values()) == 16


def test_same_seed_same_file_and_resume_regenerates_nothing(teacher, tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", quickstart_rows(40))
    config = synth_config(teacher, seeds, generation={"batch_size": 8, "max_new_tokens": 6, "temperature": 1.0}, seed=7)
    synthesize(config, tmp_path / "a", backend=teacher_backend(teacher))
    synthesize(config, tmp_path / "b", backend=teacher_backend(teacher))
    first = (tmp_path / "a/data.jsonl").read_bytes()
    assert first == (tmp_path / "b/data.jsonl").read_bytes()
    other = config.model_copy(update={"seed": 8})
    synthesize(other, tmp_path / "c", backend=teacher_backend(teacher))
    assert (tmp_path / "c/data.jsonl").read_bytes() != first  # sampling really depends on the seed

    interrupted = Planted(teacher_backend(teacher), fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        synthesize(config, tmp_path / "resumed", backend=interrupted)
    assert interrupted.prompts == 16 and not (tmp_path / "resumed/data.jsonl").exists()
    with (tmp_path / "resumed/work/generations.jsonl").open("a") as handle:
        handle.write('{"key": "cut sh')  # a line cut short by the crash
    again = Planted(teacher_backend(teacher))
    report = synthesize(config, tmp_path / "resumed", backend=again)
    assert again.prompts == 40 - 16  # only what was not written yet
    assert report["teacher_calls"] == {"new": 24, "reused": 16}
    assert (tmp_path / "resumed/data.jsonl").read_bytes() == first


class Scripted:
    """A teacher stand-in whose reply is a function of the last user message (strategy mechanics only)."""

    name = "scripted"

    def __init__(self, reply):
        self.reply = reply

    def generate(self, conversations, sampling, seed):
        return [self.reply(c[-1]["content"]) for c in conversations]


def run_scripted(tmp_path: Path, strategy: dict, reply, seeds: list[dict], **sections) -> tuple[dict, list[dict]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(tmp_path / "seeds.jsonl", seeds)
    config = SynthConfig.model_validate({"teacher": {"path": "scripted"}, "seeds": {"path": str(path), "format": "prompt_completion"},
                                         "strategy": strategy, **sections})
    report = synthesize(config, tmp_path / "out", backend=Scripted(reply))
    return report, [json.loads(line) for line in (tmp_path / "out/data.jsonl").read_text().splitlines()]


def test_evol_instruct_elimination_rules_and_rounds(tmp_path):
    evolved = {
        "Name a fruit.": "Rewritten Prompt: Name a fruit, as the given prompt asks.",  # copies the template's words
        "Name a color.": "name a COLOR",  # no new information
        "Name a city.": "Name a city in Europe.",
        "Name a tree.": "Name a tree that grows in deserts.",
        "Name a river.": "Name a river longer than 1000 km.",
    }
    answers = {"Name a city in Europe.": "Sorry, I do not know.", "Name a tree that grows in deserts.": "the of and"}

    def reply(text: str) -> str:
        if "#Given Prompt#" in text:
            given = text.split("#Given Prompt#:\n")[1].split("\n\n")[0]
            return evolved.get(given, given + " Explain step by step.")
        return answers.get(text, f"An answer to: {text}")

    seeds = [{"prompt": p, "completion": "x"} for p in evolved]
    report, rows = run_scripted(tmp_path, {"name": "evol_instruct", "rounds": 2, "ops": ["add_constraints", "deepen"]},
                                reply, seeds)
    assert report["generated"] == 10
    dropped = report["dropped"]
    assert dropped["evol_copied_prompt"] == 2 and dropped["evol_no_new_information"] == 2  # failed twice: kept evolving the original
    assert dropped["evol_response_sorry"] == 2 and dropped["evol_response_degenerate"] == 2
    assert [(r["prompt"], r["provenance"]["round"], r["provenance"]["seed_ids"]) for r in rows] == [
        ("Name a river longer than 1000 km.", 1, [4]),
        ("Name a river longer than 1000 km. Explain step by step.", 2, [4]),
    ]
    assert all(r["provenance"]["op"] in ("add_constraints", "deepen") for r in rows)


def test_self_instruct_filters_new_instructions(tmp_path):
    made = iter(["Task 9: Draw a picture of a cat.", "Hi", "List three prime numbers below ten.",
                 "?? What is this", "List three prime numbers below ten please.", "Write a haiku about the sea."])

    def reply(text: str) -> str:
        return next(made) if text.startswith("Come up with a new task") else "An answer."

    seeds = [{"prompt": p, "completion": "x"} for p in ("Sort these words: b, a.", "What is 2 plus 2?", "Name a planet.")]
    report, rows = run_scripted(tmp_path, {"name": "self_instruct", "instructions_per_round": 6, "demos": 3}, reply, seeds)
    assert report["dropped"] == {"self_instruct_bad_start": 1, "self_instruct_length": 1, "self_instruct_similar": 1,
                                 "self_instruct_unsupported_task": 1}
    assert [r["prompt"] for r in rows] == ["List three prime numbers below ten.", "Write a haiku about the sea."]
    assert all(r["provenance"]["strategy"] == "self_instruct" and len(r["provenance"]["seed_ids"]) == 3 for r in rows)


def test_rationale_is_stored_apart_from_the_answer(tmp_path):
    def reply(text: str) -> str:
        question = text.split("Question: ")[-1].split("\n")[0]
        return "I do not know." if "3" in question else f"First I read '{question}'. Then I add one.\nAnswer: 42"

    seeds = [{"prompt": f"Question number {i}?", "completion": "42"} for i in range(5)]
    report, rows = run_scripted(tmp_path, {"name": "rationale"}, reply, seeds)
    assert report["dropped"] == {"rationale_no_answer": 1}
    assert rows[0]["completion"] == "42" and rows[0]["answer"] == "42"
    assert rows[0]["rationale"] == "First I read 'Question number 0?'. Then I add one."
    report, rows = run_scripted(tmp_path / "both", {"name": "rationale"}, reply, seeds,
                                output={"target": "rationale_and_answer", "format": "alpaca"})
    assert rows[0]["output"] == "First I read 'Question number 0?'. Then I add one.\nAnswer: 42"
    assert rows[0]["instruction"] == "Question number 0?"


def test_minhash_estimates_jaccard():
    hasher = MinHasher(256)
    a = shingles("what comes next after 125 126 127 128", 3)
    for b_text in ("so what comes next after 125 126 127 128", "what comes next after 126 127 128 129", "a b c d e"):
        b = shingles(b_text, 3)
        exact = len(a & b) / len(a | b)
        assert abs(similarity(hasher.signature(a), hasher.signature(b)) - exact) < 0.1


def test_cli_synth_runs_and_explains_bad_input(teacher, tmp_path, capsys):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", quickstart_rows(8))
    config = tmp_path / "synth.yaml"
    config.write_text(yaml.safe_dump({"teacher": {"path": str(teacher), "dtype": "float32"},
                                      "seeds": {"path": str(seeds), "format": "prompt_completion"},
                                      "strategy": "answer", "generation": {"max_new_tokens": 5}}))
    code, out, _ = run_cli(capsys, "synth", str(config), "generation.temperature=0", "--output", str(tmp_path / "o"))
    assert code == 0 and "generated 8, kept" in out and (tmp_path / "o/report.json").is_file()

    code, _, err = run_cli(capsys, "synth", str(config), "generation.temprature=0")
    assert code == 2 and 'unknown key "generation.temprature" (did you mean "temperature"?)' in err
    code, _, err = run_cli(capsys, "synth", str(config), "strategy=evol-instruct")
    assert code == 2 and 'did you mean "evol_instruct"' in err
    code, _, err = run_cli(capsys, "synth", str(tmp_path / "missing.yaml"))
    assert code == 2 and err.strip() == f"tunelab: error: config file {tmp_path / 'missing.yaml'} does not exist; check the path."
    code, _, err = run_cli(capsys, "synth", str(config), f"seeds.path={tmp_path / 'nope.jsonl'}")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "synth", str(config), f"teacher.path={tmp_path / 'no-teacher'}")
    assert code == 2 and "teacher.path" in err and "does not exist" in err


def test_ready_config_trains_its_missing_teacher_first(tmp_path, capsys, monkeypatch):
    """configs/tiny/synth.yaml on a fresh clone: no teacher yet, so `teacher.train` makes it (2 steps here)."""
    monkeypatch.chdir(REPO)
    teacher = tmp_path / "teacher"
    code, out, err = run_cli(capsys, "synth", "configs/tiny/synth.yaml", f"teacher.path={teacher}", "seeds.max_samples=4",
                             "teacher.train.overrides=[training.max_steps=2,eval.before_training=false,eval.exact_match=false]",
                             "--output", str(tmp_path / "synth"))
    assert code == 0, err
    assert "holds no finished run; training the teacher first (configs/tiny/full.yaml)" in out
    assert (teacher / "summary.json").is_file() and "generated 4" in out
    code, out, _ = run_cli(capsys, "synth", "configs/tiny/synth.yaml", f"teacher.path={teacher}", "seeds.max_samples=4",
                           "--output", str(tmp_path / "synth"))
    assert code == 0 and "training the teacher" not in out and "0 replies generated, 4 reused" in out
    # A teacher retrained in place is a new teacher: nothing of the old one's replies is reused.
    (teacher / "summary.json").unlink()
    code, out, _ = run_cli(capsys, "synth", "configs/tiny/synth.yaml", f"teacher.path={teacher}", "seeds.max_samples=4",
                           "teacher.train.overrides=[training.max_steps=3,eval.before_training=false,eval.exact_match=false]",
                           "--output", str(tmp_path / "synth"))
    assert code == 0 and "4 replies generated, 0 reused" in out
    code, out, _ = run_cli(capsys, "validate", "configs/tiny/distill.yaml")
    assert code == 0
