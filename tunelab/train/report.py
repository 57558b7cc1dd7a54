"""The loss-curve plot written into every run directory."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and CI without a display
import matplotlib.pyplot as plt  # noqa: E402


def write_loss_plot(records: list[dict], path: Path, title: str) -> None:
    """Plot training loss against optimizer step; nothing is written when no step was logged."""
    if not records:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot([r["step"] for r in records], [r["loss"] for r in records], linewidth=1.5)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)
