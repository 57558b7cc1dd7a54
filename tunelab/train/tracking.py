"""Experiment tracking beyond metrics.jsonl: Weights & Biases and TensorBoard through the Trainer.

W&B never hangs on a login prompt: in ``mode: auto`` without credentials (no
``WANDB_API_KEY``, no entry in ~/.netrc) the run logs offline into the run folder and
tunelab says how to sync it. The resolved tunelab config is attached to the W&B run.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path

from transformers import TrainerCallback

from tunelab.config import Config
from tunelab.errors import UserError


def report_to(config: Config, run_dir: Path) -> list[str]:
    """The Trainer integrations to enable; sets up their environment."""
    tracking = config.tracking
    targets = []
    if tracking.wandb is not None:
        _require("wandb", "tracking.wandb")
        wandb = tracking.wandb
        os.environ["WANDB_PROJECT"] = wandb.project
        os.environ["WANDB_DIR"] = str(run_dir)
        for key, value in (("WANDB_ENTITY", wandb.entity), ("WANDB_NOTES", wandb.notes),
                           ("WANDB_TAGS", ",".join(wandb.tags) or None)):
            if value is not None:
                os.environ[key] = value
        mode = wandb.mode
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if _has_credentials() else "offline")
            if mode == "offline":
                print(f"tunelab: W&B: no credentials found, logging offline to {run_dir / 'wandb'} "
                      "(upload later with: wandb sync <that folder>/offline-run-*)")
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")
        targets.append("wandb")
    if tracking.tensorboard:
        _require("tensorboard", "tracking.tensorboard")
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
        targets.append("tensorboard")
    return targets


class AttachConfig(TrainerCallback):
    """Put the resolved tunelab config on the W&B run (the Trainer only sends its own arguments),
    and close the run when training ends so its file is complete."""

    def __init__(self, config: Config):
        self.config = config

    def on_train_begin(self, args, state, control, **kwargs):
        import wandb

        if wandb.run is not None:
            wandb.run.config.update({"tunelab": self.config.model_dump(mode="json")}, allow_val_change=True)

    def on_train_end(self, args, state, control, **kwargs):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _require(package: str, key: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise UserError(f'{key} needs the {package} package, which is not installed; run pip install "tunelab[tracking]".')
