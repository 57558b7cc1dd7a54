"""Trainer callbacks: the metrics.jsonl log and a concise console progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from tunelab.errors import UserError
from tunelab.io import atomic_write_text

# Keys of the Trainer's own log dict; anything else in it came from the recipe.
STANDARD_LOG_KEYS = {"loss", "learning_rate", "grad_norm", "epoch", "num_input_tokens_seen", "num_tokens"}


class MetricsLogger(TrainerCallback):
    """Append one JSON object per logged step to ``metrics.jsonl`` and keep them for the summary.

    Besides the Trainer's values, a record holds what ``RecipeTrainer.log`` adds (tokens/s:
    non-padding input tokens per second since the previous log; peak memory; the recipe's
    own values), the same numbers W&B and TensorBoard receive.
    """

    def __init__(self, path: Path, resume_step: int | None = None, writer: bool = True):
        """With ``resume_step``, keep the records up to that checkpoint and drop later ones
        (they are about to be recomputed), so the log never holds a step twice. Only the
        ``writer`` (the main process) touches the file."""
        self.path = path
        self.records: list[dict] = []
        if resume_step is not None and path.exists() and writer:
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [r for r in kept if r["step"] <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": logs["loss"],
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
        }
        record.update({k: v for k, v in logs.items() if k not in STANDARD_LOG_KEYS and not k.startswith("train_")})
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        # Checked before this step's checkpoint is written (the Trainer logs, then saves), so a
        # step whose loss or update went bad never becomes a checkpoint.
        bad = [key for key in ("loss", "grad_norm") if record[key] is not None and not math.isfinite(record[key])]
        if bad:
            checkpoints = sorted(self.path.parent.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            kept = (f"the last good checkpoint is {checkpoints[-1]} (--resume continues from it)" if checkpoints
                    else "no checkpoint had been saved yet")
            raise UserError(
                f"the training {bad[0].replace('_', ' ')} became {record[bad[0]]} at step {record['step']}, so the run "
                f"was stopped; {kept}. Lower training.learning_rate or check the data."
            )


class ConsoleProgress(TrainerCallback):
    """One progress bar with the latest loss and learning rate; no per-step dict dumps."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state: TrainerState, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state: TrainerState, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state: TrainerState, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
