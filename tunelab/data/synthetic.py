"""Placeholder; replaced by the quickstart task generator."""


def tokenizer_corpus() -> list[str]:
    import random

    rng = random.Random(0)
    return [f"{a}+{b}={a+b}" for a in range(100) for b in range(100)] + ["the quick brown fox " * 3] * 10
