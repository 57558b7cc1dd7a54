"""Exact and near-duplicate removal: normalised text equality, then MinHash with LSH banding.

Near-duplicates are judged on word n-gram sets (Jaccard similarity). MinHash estimates it
cheaply: for each of ``num_perm`` salted hash functions keep the minimum hash over the set;
two sets agree on one such minimum with probability equal to their Jaccard similarity.
LSH splits the signature into bands, so only items sharing a whole band are compared, and a
candidate pair is confirmed by its estimated similarity. The first occurrence is kept.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections import defaultdict

from tunelab.synth.candidate import Candidate

_MASK = (1 << 61) - 1  # a Mersenne prime: the modulus of the universal hash family


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def shingles(text: str, n: int) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))} if words else {""}


class MinHasher:
    def __init__(self, num_perm: int, seed: int = 0):
        params = hashlib.sha256(f"minhash-{seed}".encode()).digest()
        stream = b"".join(hashlib.sha256(params + i.to_bytes(4, "big")).digest() for i in range(num_perm))
        pairs = struct.unpack(f">{2 * num_perm}Q", stream[: 16 * num_perm])
        self.a = [(x % (_MASK - 1)) + 1 for x in pairs[0::2]]
        self.b = [x % _MASK for x in pairs[1::2]]

    def signature(self, items: set[str]) -> tuple[int, ...]:
        hashes = [int.from_bytes(hashlib.blake2b(item.encode(), digest_size=8).digest(), "big") for item in items]
        return tuple(min((a * h + b) & _MASK for h in hashes) for a, b in zip(self.a, self.b, strict=True))


def similarity(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Estimated Jaccard similarity: the share of agreeing MinHash values."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


class NearDuplicateIndex:
    def __init__(self, ngram: int, threshold: float, num_perm: int, bands: int):
        self.hasher, self.ngram, self.threshold = MinHasher(num_perm), ngram, threshold
        self.rows = num_perm // bands
        self.bands: list[dict[tuple, list[int]]] = [defaultdict(list) for _ in range(bands)]
        self.signatures: list[tuple[int, ...]] = []

    def find(self, text: str) -> tuple[bool, tuple[int, ...]]:
        """Whether ``text`` is a near-duplicate of something added, and its signature."""
        signature = self.hasher.signature(shingles(text, self.ngram))
        seen: set[int] = set()
        for band, buckets in enumerate(self.bands):
            for other in buckets.get(signature[band * self.rows : (band + 1) * self.rows], ()):
                if other not in seen:
                    seen.add(other)
                    if similarity(signature, self.signatures[other]) >= self.threshold:
                        return True, signature
        return False, signature

    def add(self, signature: tuple[int, ...]) -> None:
        index = len(self.signatures)
        self.signatures.append(signature)
        for band, buckets in enumerate(self.bands):
            buckets[signature[band * self.rows : (band + 1) * self.rows]].append(index)


def text_of(candidate: Candidate) -> str:
    return f"{candidate.prompt}\n{candidate.answer}"


def drop_duplicates(candidates: list[Candidate], exact: bool, near: NearDuplicateIndex | None) -> None:
    """Mark later copies: ``duplicate_exact`` (same text after case/space normalising), then ``duplicate_near``."""
    seen: set[str] = set()
    for candidate in candidates:
        if candidate.dropped is not None:
            continue
        key = normalise(text_of(candidate))
        if exact and key in seen:
            candidate.dropped = "duplicate_exact"
            continue
        seen.add(key)
        if near is not None:
            duplicate, signature = near.find(text_of(candidate))
            if duplicate:
                candidate.dropped = "duplicate_near"
                continue
            near.add(signature)
