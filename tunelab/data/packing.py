"""Sample packing: several examples per row, each attending only to itself.

A packed row is the concatenation of whole examples (never split), at most
``max_length`` tokens. The collator gives every example its own position ids
(0, 1, 2, ... restarting at each example) and passes no attention mask:
transformers then reads the example boundaries from the position ids and builds a
block-diagonal causal mask (SDPA and eager on CPU or GPU) or uses the varlen path
(flash-attention 2). The first label of each example is masked, because in a
packed row it would be the target of the previous example's last token; unpacked,
that label is never a target either. So the summed token loss and its gradients
are those of the examples run one by one (tests/test_packing.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from tunelab.data.encode import IGNORE_INDEX, Encoded

# Batch key holding the real-token mask of packed rows. It is only for counting tokens
# (an attention mask would switch off the per-example masking) and never reaches the model.
REAL_TOKENS_KEY = "packed_real_tokens"


def pack(examples: Sequence[Encoded], max_length: int) -> list[list[Encoded]]:
    """Group ``examples`` into rows of at most ``max_length`` tokens (best-fit decreasing, deterministic)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[Encoded]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        size = len(examples[i].input_ids)
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            space, row = free.pop(slot)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(examples[i])
        if space - size > 0:
            bisect.insort(free, (space - size, row))
    return rows


def padding_fraction(lengths: Sequence[int], batch_size: int) -> float:
    """Share of pad tokens when rows of ``lengths`` are batched in order and padded to each batch's longest."""
    padded = sum(max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size))
    return 1 - sum(lengths) / padded if padded else 0.0


def pack_with_report(examples: Sequence[Encoded], max_length: int, batch_size: int) -> tuple[list[list[Encoded]], dict, str]:
    """Packed rows, the counts that go into summary.json, and the line that reports them."""
    rows = pack(examples, max_length)
    unpacked = padding_fraction([len(e.input_ids) for e in examples], batch_size)
    packed = padding_fraction([sum(len(e.input_ids) for e in row) for row in rows], batch_size)
    stats = {"packed_rows": len(rows), "padding_fraction_unpacked": round(unpacked, 4), "padding_fraction_packed": round(packed, 4)}
    line = f"packing: {len(examples)} examples in {len(rows)} rows; padding {unpacked:.1%} unpacked -> {packed:.1%} packed"
    return rows, stats, line


class PackCollator:
    """Batch packed rows: per-example position ids, first label of each example masked, no attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[Sequence[Encoded]]) -> dict:
        width = max(sum(len(e.input_ids) for e in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        real = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                n = len(example.input_ids)
                input_ids[r, start : start + n] = torch.tensor(example.input_ids)
                labels[r, start + 1 : start + n] = torch.tensor(example.labels[1:])
                position_ids[r, start : start + n] = torch.arange(n)
                start += n
            real[r, :start] = 1
            # Padding continues as one more "example" of its own, so no real token attends to it.
            position_ids[r, start:] = torch.arange(width - start)
        # No KV cache while training: transformers only detects packed rows without one.
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False,
                REAL_TOKENS_KEY: real}
