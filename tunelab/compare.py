"""``tunelab compare``: train several configs on the same task and budget, print one table.

Each config trains in its own process, so the peak memory of a row belongs to that
recipe alone (a process's peak resident size never goes down). All configs are
validated first: a typo in the last one fails before the first one trains.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tunelab.config import load_config
from tunelab.io import atomic_write_text

COLUMNS = ["recipe", "trainable", "train s", "peak RSS MB", "eval loss", "exact match", "prior-skill loss"]


def compare(configs: Sequence[str], overrides: Sequence[str], output_dir: Path) -> list[dict]:
    """Train every config (with the same ``overrides``) under ``output_dir``; return one summary per config."""
    for path in configs:
        load_config(path, overrides)
    rows = []
    for path in configs:
        run_dir = output_dir / Path(path).stem
        print(f"tunelab: compare: training {path} -> {run_dir}", flush=True)
        command = [sys.executable, "-m", "tunelab", "train", str(path), "--output", str(run_dir), "--overwrite", *overrides]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            error = [line for line in finished.stderr.splitlines() if line.strip()][-1:] or ["(no message)"]
            rows.append({"config": str(path), "error": error[0]})
            continue
        rows.append({"config": str(path), **json.loads((run_dir / "summary.json").read_text())})
    atomic_write_text(output_dir / "compare.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(output_dir / "compare.md", format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table; before -> after for the held-out metrics, "-" where a run has none."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {Path(row['config']).stem} | failed: {row['error']} |" + " |" * (len(COLUMNS) - 2))
            continue
        cells = [
            row["recipe"],
            f"{row['trainable_parameters']:,} ({row['trainable_parameters'] / row['total_parameters']:.1%})",
            f"{row['train_time_s']:.1f}",
            f"{row['peak_memory_mb']['rss']:.0f}",
            _change(row, "eval", "loss", "{:.3f}"),
            _change(row, "eval", "exact_match", "{:.0%}"),
            _change(row, "retention", "loss", "{:.3f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _change(row: dict, prefix: str, key: str, fmt: str) -> str:
    before, after = row.get(f"{prefix}_before") or {}, row.get(f"{prefix}_after") or {}
    if key not in after:
        return "-"
    return (fmt.format(before[key]) + " → " if key in before else "") + fmt.format(after[key])
