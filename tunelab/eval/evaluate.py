"""``tunelab eval``: held-out metrics of a model or run on any dataset, next to its base.

The same encoded examples (the fine-tuned model's tokenizer and chat template) go
through both models, so the two columns differ only by the training.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tunelab.config.schema import DataConfig, DatasetSource
from tunelab.data.encode import encode_sources
from tunelab.errors import UserError
from tunelab.eval.heldout import exact_match, heldout_loss
from tunelab.models.trained import load_model_or_run, load_run_base

ROWS = [("loss", "{:.4f}"), ("perplexity", "{:.2f}"), ("exact_match", "{:.1%}"), ("contains", "{:.1%}")]


def evaluate(reference: str, data: str, fmt: str, max_samples: int, max_new_tokens: int, batch_size: int,
             max_length: int = 2048) -> dict:
    """{"base": metrics | None, "model": metrics, "examples": n} for ``reference`` on ``data``."""
    model, tokenizer = load_model_or_run(reference)
    if fmt != "text" and not tokenizer.chat_template:
        raise UserError(f"{reference} has no chat template, so --format {fmt} cannot be rendered; use --format text.")
    source = DatasetSource(path=data, format=fmt, max_samples=max_samples)
    config = DataConfig(datasets=[source], max_length=max_length, cache=False)
    examples = encode_sources(config, [source], "--data", tokenizer, Counter())
    base = load_run_base(reference) if (Path(reference) / "config.yaml").is_file() else None
    results = {}
    for name, candidate in (("base", base), ("model", model)):
        if candidate is None:
            results[name] = None
            continue
        metrics = heldout_loss(candidate, examples, tokenizer.pad_token_id, batch_size)
        if fmt != "text":
            metrics |= exact_match(candidate, tokenizer, examples, max_new_tokens, batch_size)
        results[name] = metrics
    return {**results, "examples": len(examples), "data": data}


def format_table(result: dict) -> str:
    columns = [name for name in ("base", "model") if result[name] is not None]
    lines = ["| metric | " + " | ".join("base" if c == "base" else "fine-tuned" for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for key, fmt in ROWS:
        if key in result["model"]:
            lines.append(f"| {key} | " + " | ".join(fmt.format(result[c][key]) for c in columns) + " |")
    return "\n".join(lines) + f"\n({result['examples']} examples from {result['data']})\n"


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2) + "\n"
