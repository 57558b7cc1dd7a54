"""``tunelab data``: see what the model will be trained on before training it.

Shows examples exactly as tokenized, with the tokens that carry loss set apart
(green on a terminal, ``[[...]]`` otherwise), and the statistics that catch most
data mistakes: lengths, truncation and drops, and the share of tokens trained.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from tunelab.config import Config
from tunelab.data.cache import cached_splits
from tunelab.data.encode import IGNORE_INDEX, Encoded, Splits, build_splits
from tunelab.data.packing import pack_with_report, padding_fraction
from tunelab.data.templates import apply_template_choice
from tunelab.models.load import load_tokenizer

GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def use_color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def render(example: Encoded, tokenizer: PreTrainedTokenizerBase, color: bool) -> str:
    """The example's text, runs of trained tokens marked."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    parts = []
    for trained, tokens in runs:
        text = tokenizer.decode(tokens)
        if color:
            parts.append(f"{GREEN}{text}{RESET}" if trained else f"{DIM}{text}{RESET}")
        else:
            parts.append(f"[[{text}]]" if trained else text)
    return "".join(parts)


def percentile(sorted_values: Sequence[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def statistics(splits: Splits, config: Config) -> list[str]:
    lines = []
    for name, items in (("train", splits.train), ("eval", splits.eval)):
        if not items:
            continue
        lengths = sorted(len(e.input_ids) for e in items)
        tokens = sum(lengths)
        trained = sum(label != IGNORE_INDEX for e in items for label in e.labels)
        lines.append(
            f"{name}: {len(items)} examples, {tokens} tokens; length p50 {percentile(lengths, 0.5)}, "
            f"p90 {percentile(lengths, 0.9)}, p99 {percentile(lengths, 0.99)}, max {lengths[-1]}; "
            f"{trained / tokens:.1%} of tokens carry loss"
        )
    stats = splits.stats
    lines.append(
        f"rows read: {stats['rows']}; longer than data.max_length={config.data.max_length}: "
        f"{stats['truncated_overlong']} truncated, {stats['dropped_overlong']} dropped; "
        f"{stats['dropped_no_trained_tokens']} dropped with no trained token left"
    )
    lines += [f"{key}: {value}" for key, value in sorted(stats.items()) if key.endswith(" examples")]
    batch = config.training.micro_batch_size
    if config.data.packing:
        lines.append(pack_with_report(splits.train, config.data.max_length, batch)[2])
    else:
        unpacked = padding_fraction([len(e.input_ids) for e in splits.train], batch)
        lines.append(f"padding at micro_batch_size {batch}: {unpacked:.1%} of tokens (data.packing is off)")
    return lines


def describe(config: Config, n_examples: int, split: str, color: bool) -> str:
    tokenizer = load_tokenizer(config.model)
    if any(source.format != "text" for source in config.data.datasets + config.data.eval_datasets):
        apply_template_choice(tokenizer, config.data.chat_template)
    splits, from_cache = cached_splits(config.data, tokenizer, config.training.seed, build_splits)
    items = splits.train if split == "train" else splits.eval
    legend = "green = trained tokens" if color else "[[...]] = trained tokens"
    out = [f"{min(n_examples, len(items))} of {len(items)} {split} examples ({legend}):"]
    for index, example in enumerate(items[:n_examples]):
        out += [f"--- {split} example {index} ({len(example.input_ids)} tokens)", render(example, tokenizer, color)]
    out += ["--- statistics" + (" (tokenized data from the cache)" if from_cache else ""), *statistics(splits, config)]
    return "\n".join(out)
