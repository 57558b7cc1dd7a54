"""Synthetic tasks for the quickstart and the tests, and the built-in tokenizer's corpus.

The quickstart needs a base model that knows something and a skill it lacks:

* ``counting_corpus``: plain text of consecutive numbers ("457,458,459,460"). The
  full fine-tuning recipe pretrains the tiny base on it, so the base learns to count.
* ``next_number_chat``: the chat question "What comes next after 439,440,441?" with
  answer "442". The base never saw the chat format; LoRA on the attention layers
  teaches it to use its counting knowledge there. Held-out numbers measure the skill,
  not memorisation, and the same adapter on an untrained base stays far lower.

Numbers are written so every number is a pure-digit pre-token, and the built-in
tokenizer is trained on text without digits, so digits are always single tokens:
"457" is the same three tokens in the corpus, the prompt and the answer.

Regenerate the committed quickstart files with
``python -m tunelab.data.synthetic configs/data/quickstart``.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

MAX_NUMBER = 999
NEXT_NUMBER_PROMPT = "What comes next after {a},{b},{c}?"

_PROSE = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
A language model predicts the next token from the tokens that came before it.
Fine-tuning adapts a pretrained model to a new task with a small amount of data.
Low-rank adapters train two thin matrices beside each frozen weight of the model.
Count the apples in the basket, then write the answer as a number.
Which number comes right after the one in the question? Answer with the number only.
What is the sum of the two numbers? Please reply with a single word.
The teacher asked a question and the student gave a short answer.
You are a helpful assistant. Be brief and answer the question that was asked.
Numbers, letters and words are all made of bytes before they become tokens.
In the morning the river was calm, and by the evening the wind had turned cold.
She wrote the list again, one item per line, and checked every entry twice.
Reverse the letters of the word, sort them, or repeat them exactly as given.
Translate the sentence, summarise the paragraph, or classify the review.
"""


def counting_corpus(rows: int = 2000, runs_per_row: int = 8, run_length: int = 4, seed: int = 0) -> list[dict]:
    """Rows of text, each ``runs_per_row`` lines of ``run_length`` consecutive numbers."""
    rng = random.Random(seed)
    starts = range(MAX_NUMBER - run_length + 2)
    return [
        {"text": "\n".join(",".join(str(s + i) for i in range(run_length)) for s in rng.choices(starts, k=runs_per_row))}
        for _ in range(rows)
    ]


def next_number_chat(n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Prompt/completion rows asking for n+1 after "n-2,n-1,n" for every n in 2..998, split (train, held-out)."""
    numbers = list(range(2, MAX_NUMBER))
    random.Random(seed).shuffle(numbers)
    rows = [{"prompt": NEXT_NUMBER_PROMPT.format(a=n - 2, b=n - 1, c=n), "completion": str(n + 1)} for n in numbers]
    return rows[n_eval:], rows[:n_eval]


def tokenizer_corpus() -> list[str]:
    """Digit-free text for BPE training, so no merge ever joins two digits."""
    lines = _PROSE.splitlines() + [NEXT_NUMBER_PROMPT, "What is the answer?", "plus minus times equals"]
    return [re.sub(r"\d", "", line) for line in lines]


def write_quickstart_data(out_dir: str | Path) -> None:
    """Write pretrain.jsonl, train.jsonl, eval.jsonl and retention.jsonl for the quickstart configs.

    retention.jsonl is fresh counting text (another seed): the base's prior skill, measured
    before and after fine-tuning to show how much of it a recipe forgets.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = next_number_chat()
    sets = (("pretrain", counting_corpus()), ("train", train), ("eval", held_out), ("retention", counting_corpus(100, seed=1)))
    for name, rows in sets:
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    write_quickstart_data(sys.argv[1] if len(sys.argv) > 1 else "configs/data/quickstart")
