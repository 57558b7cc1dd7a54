"""Every batch the teacher answers is committed to a journal before the next one starts.

A batch is keyed by what determines its replies (the teacher, down to its files' sizes and times,
sampling settings, the batch's seed and its conversations). A rerun after an interruption finds the batches already answered and reuses
them, so nothing written is generated again and the final file is the one an uninterrupted run
writes. Each batch is one appended line, flushed and fsynced; a line cut short by a crash is
cut off when the journal is opened again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from tunelab.data.formats import Message
from tunelab.synth.backend import Backend, Sampling, settings_id
from tunelab.synth.teacher import identity


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list[str]] = {}
        if path.is_file():
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]
            if len(complete) != len(data):  # a line cut short by a crash
                with path.open("r+b") as handle:
                    handle.truncate(len(complete))
            for line in complete.decode("utf-8").splitlines():
                record = json.loads(line)
                self.entries[record["key"]] = record["outputs"]
        path.parent.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> list[str] | None:
        return self.entries.get(key)

    def commit(self, key: str, outputs: list[str]) -> None:
        line = json.dumps({"key": key, "outputs": outputs}, ensure_ascii=False) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.entries[key] = outputs


class Generator:
    """Batched, seeded, journaled generation with a progress bar (ETA) per phase."""

    def __init__(self, backend: Backend, sampling: Sampling, batch_size: int, seed: int, journal: Journal):
        self.backend, self.sampling, self.batch_size, self.seed, self.journal = backend, sampling, batch_size, seed, journal
        self.identity = identity(backend.name)
        self.generated = 0  # replies produced by the teacher in this process (not reused)
        self.reused = 0

    def __call__(self, phase: str, conversations: list[list[Message]]) -> list[str]:
        """Replies to ``conversations``; ``phase`` names the step (a stable name keeps seeds and keys stable)."""
        replies: list[str] = []
        if not conversations:
            return replies
        with tqdm(total=len(conversations), desc=phase, unit="prompt", dynamic_ncols=True, leave=False) as bar:
            for start in range(0, len(conversations), self.batch_size):
                chunk = conversations[start : start + self.batch_size]
                seed = int(hashlib.sha256(f"{self.seed}:{phase}:{start}".encode()).hexdigest()[:8], 16)
                key = hashlib.sha256(json.dumps([self.identity, settings_id(self.sampling), seed, chunk],
                                                sort_keys=True).encode()).hexdigest()
                outputs = self.journal.get(key)
                if outputs is None:
                    outputs = self.backend.generate(chunk, self.sampling, seed)
                    self.journal.commit(key, outputs)
                    self.generated += len(chunk)
                else:
                    self.reused += len(chunk)
                replies += outputs
                bar.update(len(chunk))
        return replies
