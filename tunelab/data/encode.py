"""Tokenize examples with exact label masks, and build the train/eval splits.

Chats are rendered with the chat template turn by turn: the prompt part up to each
assistant turn (with the generation prompt) and the assistant part are tokenized
as separate segments. The prompt segments are therefore tokenized exactly as at
inference time, and the label mask follows segment boundaries exactly: assistant
content plus its end-of-turn token carry loss, everything else is -100 unless
``train_on_inputs`` is set. Raw text is trained in full, with EOS appended.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from tunelab.config.schema import DataConfig
from tunelab.data.formats import Example, Message, to_example
from tunelab.data.sources import load_source
from tunelab.errors import UserError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """A tokenized example; ``prompt``/``answer`` are set for chats (used by exact-match eval)."""

    input_ids: list[int]
    labels: list[int]
    prompt: str | None = None
    answer: str | None = None


@dataclass
class Splits:
    train: list[Encoded]
    eval: list[Encoded]
    # overlong handling and other per-run data counts, reported in the summary
    stats: Counter = field(default_factory=Counter)


def render_segments(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[tuple[str, bool]]:
    """Split a rendered chat into (text, is_assistant) segments using the chat template."""

    def render(turns: list[Message], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], True)
        full = render(messages[: index + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError(
                "the chat template does not render conversations prefix-by-prefix, so assistant tokens "
                "cannot be masked exactly; set data.chat_template to a built-in template such as chatml."
            )
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = render(messages, False)[len(done) :]
    if rest:
        segments.append((rest, False))
    return [(text, trained) for text, trained in segments if text]


def encode_example(
    example: Example, tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool, assistant_turns: str = "all"
) -> Encoded:
    """Token ids and labels; with ``assistant_turns="last"`` only the final assistant turn carries loss."""
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True).input_ids + [tokenizer.eos_token_id]
        return Encoded(input_ids=ids, labels=list(ids))
    assert example.messages is not None
    input_ids: list[int] = []
    labels: list[int] = []
    segments = render_segments(tokenizer, example.messages)
    last_assistant = max(i for i, (_, is_assistant) in enumerate(segments) if is_assistant)
    for index, (text, is_assistant) in enumerate(segments):
        trained = is_assistant and (assistant_turns == "all" or index == last_assistant)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        input_ids += ids
        labels += ids if (trained or train_on_inputs) else [IGNORE_INDEX] * len(ids)
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    prompt = tokenizer.apply_chat_template(example.messages[:last], tokenize=False, add_generation_prompt=True)
    return Encoded(input_ids, labels, prompt=prompt, answer=example.messages[last]["content"])


def build_splits(data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> Splits:
    """Load, normalise, tokenize and split all configured sources."""
    stats: Counter = Counter()
    train = encode_sources(data, data.datasets, "data.datasets", tokenizer, stats, seed)
    if data.eval_datasets:
        eval_ = encode_sources(data, data.eval_datasets, "data.eval_datasets", tokenizer, stats, seed)
    elif data.eval_ratio > 0:
        # Split distinct examples, so a row repeated by a weight never lands on both sides.
        distinct = list({id(item): item for item in train}.values())
        random.Random(seed).shuffle(distinct)
        n_eval = max(1, round(len(distinct) * data.eval_ratio))
        if n_eval >= len(distinct):
            raise UserError(f"data.eval_ratio {data.eval_ratio} leaves no training rows out of {len(distinct)}; lower it.")
        copies = Counter(id(item) for item in train)
        eval_ = distinct[:n_eval]
        train = [item for item in distinct[n_eval:] for _ in range(copies[id(item)])]
    else:
        eval_ = []
    if not train:
        raise UserError("no training rows are left after length filtering; raise data.max_length or set data.overlong: truncate.")
    if stats["dropped_no_trained_tokens"]:
        print(
            f"tunelab: warning: {stats['dropped_no_trained_tokens']} rows had no trained token left after truncation "
            f"to data.max_length={data.max_length} and were dropped (counted in summary.json).",
            file=sys.stderr,
        )
    return Splits(train=train, eval=eval_, stats=stats)


def encode_sources(data: DataConfig, sources, key: str, tokenizer, stats: Counter, seed: int = 0) -> list[Encoded]:
    """Encode every row of ``sources`` (``key`` names them in messages), applying the length policy and weights."""
    encoded: list[Encoded] = []
    for index, source in enumerate(sources):
        rows = load_source(source, f"{key}[{index}]")
        items = []
        for row_number, row in enumerate(rows):
            where = f'{key}[{index}] "{source.path}" row {row_number}'
            example = to_example(row, source.format, where, source.fields, source.system_prompt)
            item = _fit_length(encode_example(example, tokenizer, data.train_on_inputs, data.assistant_turns), data, where, stats)
            if item is not None:
                items.append(item)
        stats["rows"] += len(rows)
        items = apply_weight(items, source.weight, random.Random(f"{seed}-{key}-{index}"))
        stats[f"{key}[{index}] examples"] = len(items)
        encoded += items
    return encoded


def apply_weight(items: list[Encoded], weight: float, rng: random.Random) -> list[Encoded]:
    """``weight`` copies of ``items``: whole repeats, then a random sample for the fractional part."""
    whole, fraction = divmod(weight, 1.0)
    return items * int(whole) + rng.sample(items, round(fraction * len(items)))


def _fit_length(item: Encoded, data: DataConfig, where: str, stats: Counter) -> Encoded | None:
    if len(item.input_ids) <= data.max_length:
        return item
    if data.overlong == "error":
        raise UserError(
            f"{where} has {len(item.input_ids)} tokens, more than data.max_length={data.max_length}; "
            "raise data.max_length or set data.overlong to truncate or drop."
        )
    if data.overlong == "drop":
        stats["dropped_overlong"] += 1
        return None
    stats["truncated_overlong"] += 1
    labels = item.labels[: data.max_length]
    if all(label == IGNORE_INDEX for label in labels):
        stats["dropped_no_trained_tokens"] += 1
        return None
    return Encoded(item.input_ids[: data.max_length], labels, item.prompt, item.answer)
