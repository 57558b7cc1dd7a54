"""The synthetic-data stage: a teacher generates, a critic and rules filter, duplicates go, a dataset comes out.

``tunelab synth CONFIG`` runs it (``run.synthesize``); the output folder holds ``data.jsonl`` in a
format tunelab trains on, with per-row provenance, and ``report.json`` with what was dropped and why.
"""
