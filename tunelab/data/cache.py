"""Cache of tokenized splits, keyed by everything that shapes them.

The key hashes: the bytes of every local data file (hub datasets: the ``datasets``
fingerprint of what was loaded), the tokenizer (its full serialisation, special
tokens and chat template), every data setting (formats, field mappings, weights,
templates, length policy; not packing, which happens after), the seed of the eval
split, and a version bumped whenever tunelab's encoding changes. Change any of
them and the cache is rebuilt; nothing is reused on a guess such as file times.
Entries are JSON files written atomically under ``$TUNELAB_CACHE/data``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tunelab.config.schema import DataConfig, DatasetSource
from tunelab.data.encode import Encoded, Splits
from tunelab.data.sources import load_source, local_files
from tunelab.io import atomic_write_text, cache_dir

ENCODING_VERSION = 1  # bump when encode.py's output for the same input changes


def splits_key(data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> str:
    digest = hashlib.sha256()
    settings = data.model_dump(mode="json", exclude={"cache", "packing"})
    digest.update(json.dumps({"version": ENCODING_VERSION, "seed": seed, "data": settings}, sort_keys=True).encode())
    for key, sources in (("data.datasets", data.datasets), ("data.eval_datasets", data.eval_datasets)):
        for index, source in enumerate(sources):
            digest.update(_content_id(source, f"{key}[{index}]").encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.special_tokens_map], sort_keys=True, default=str)
    return hashlib.sha256((vocabulary + extra).encode()).hexdigest()


def _content_id(source: DatasetSource, key: str) -> str:
    files = local_files(source, key)
    if files is None:
        return "hub:" + load_source(source, key)._fingerprint
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "files:" + digest.hexdigest()


def load_cached(path: Path) -> Splits | None:
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable entries are rebuilt
    return Splits(
        train=[Encoded(*item) for item in saved["train"]],
        eval=[Encoded(*item) for item in saved["eval"]],
        stats=Counter(saved["stats"]),
    )


def save_cached(path: Path, splits: Splits) -> None:
    def rows(items: list[Encoded]) -> list:
        return [[e.input_ids, e.labels, e.prompt, e.answer] for e in items]

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"train": rows(splits.train), "eval": rows(splits.eval), "stats": dict(splits.stats)}))


def cached_splits(data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, build) -> tuple[Splits, bool]:
    """``build(data, tokenizer, seed)`` through the cache; returns (splits, whether the cache was used)."""
    if not data.cache:
        return build(data, tokenizer, seed), False
    path = cache_dir() / "data" / f"{splits_key(data, tokenizer, seed)}.json"
    cached = load_cached(path)
    if cached is not None:
        return cached, True
    splits = build(data, tokenizer, seed)
    save_cached(path, splits)
    return splits, False
