"""Shared fixtures: an isolated tunelab cache, the built-in tiny model, small datasets."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from tunelab.cli import main

# Deterministic and quiet: one intra-op thread keeps pinned losses stable across machines
# and keeps parallel test processes from fighting over the 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def tunelab_cache(tmp_path_factory) -> Path:
    """Built-in models are built once per test session into a private cache."""
    cache = tmp_path_factory.mktemp("tunelab-cache")
    os.environ["TUNELAB_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(tunelab_cache) -> Path:
    from tunelab.models.load import resolve_model_path

    return Path(resolve_model_path("builtin:tiny-llama"))


@pytest.fixture(scope="session")
def addition_jsonl(tmp_path_factory) -> Path:
    """200 prompt/completion rows: 'What is a plus b?' -> 'a+b'."""
    path = tmp_path_factory.mktemp("data") / "addition.jsonl"
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(200):
            a, b = rng.randrange(50), rng.randrange(50)
            handle.write(json.dumps({"prompt": f"What is {a} plus {b}?", "completion": str(a + b)}) + "\n")
    return path


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err
