"""HF ``Trainer`` with the hooks recipes need (extra loss terms, extra logged values), packed batches,
and atomic checkpoints.

A regulariser must be part of the loss that is back-propagated, not a number
computed beside it; TRL's SFTTrainer, for one, ignores anything a model adds to
``outputs.loss``. Here each term the recipe returns is added to the batch loss,
scaled the way the Trainer scales that loss for gradient accumulation, and its
mean over the logging interval is logged under its own name.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from tunelab.data.packing import REAL_TOKENS_KEY
from tunelab.recipes import Recipe


class RecipeTrainer(Trainer):
    def __init__(self, *args, recipe: Recipe, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self._term_sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self._term_counts: dict[str, int] = defaultdict(int)
        self._staging_root: str | None = None
        self._rate_clock: tuple[float, int] | None = None  # (time, tokens seen) at the previous log
        self.add_callback(_StartClock(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if REAL_TOKENS_KEY in inputs:  # packed batches only: counted by the Trainer, not a model input
            inputs = {k: v for k, v in inputs.items() if k != REAL_TOKENS_KEY}
        # Head and loss fused (tunelab.kernels) in training steps of models the patch qualified; never when
        # the recipe reads the logits. Same loss, same normalisation, no full logits tensor.
        kernels = getattr(self.model, "tunelab_kernels", None)
        fuse = model.training and "labels" in inputs and not self.recipe.needs_logits
        with kernels.loss_context(fuse) if kernels is not None else contextlib.nullcontext():
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            loss, logged = self.recipe.objective(model, inputs, outputs, loss, self._token_divisor(inputs, num_items_in_batch))
            self._add_to_log(logged)
        terms = self.recipe.loss_terms(model, inputs) if model.training else {}
        if terms:
            # When the LM loss is already normalised over the whole accumulated batch the
            # Trainer will not divide it again, so a per-micro-batch term must be divided here.
            scaled_for_accumulation = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            divisor = self.current_gradient_accumulation_steps if scaled_for_accumulation else 1
            for name, value in terms.items():
                loss = loss + value / divisor
            self._add_to_log(terms)
        return (loss, outputs) if return_outputs else loss

    def _add_to_log(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self._term_sums[name] = self._term_sums[name] + value.detach()  # stays on device until logged
            self._term_counts[name] += 1

    def _token_divisor(self, inputs: dict[str, torch.Tensor], num_items_in_batch) -> torch.Tensor | float:
        """What a per-token loss sum is divided by to match the Trainer's LM loss of this micro-batch.

        With ``num_items_in_batch`` the model normalises over the whole accumulated batch (and the
        Trainer multiplies by the process count when averaging tokens across devices); otherwise the
        LM loss is this micro-batch's mean over its trained tokens.
        """
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            return num_items_in_batch / scale
        return (inputs["labels"][:, 1:] != -100).sum().clamp(min=1)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
            # accelerate enables FSDP for accelerator devices only and would silently train DDP on a
            # CPU (gloo) group; FSDP2 itself runs there, so the same plugin is switched on here.
            from accelerate.utils import FullyShardedDataParallelPlugin

            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The trained model's complete state dict, gathered from every process's shards.

        Collective: every process must call it. The main process gets the tensors, the others
        ``None``; ``None`` also when nothing is sharded (the model holds its own weights then).
        """
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            return None
        if self.is_fsdp_enabled:
            # Checkpoints keep FSDP's sharded state dict type, so accelerate's get_state_dict would
            # return shards; ask torch for the full one, gathered into CPU memory of the main process.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state_dict = get_model_state_dict(self.accelerator.unwrap_model(self.model_wrapped), options=options)
        else:
            state_dict = self.accelerator.get_state_dict(self.model_wrapped)
        return state_dict if self.args.should_save else None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # After the weights: the recipe's own state may reshape how they are used (AdaLoRA's ranks).
        self.recipe.load_checkpoint_state(self.model, Path(resume_from_checkpoint))

    def _get_output_dir(self, trial):
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Save into a hidden staging folder, then rename it into place: a checkpoint that is
        visible is complete, even if the process dies in the middle of a save."""
        final_root = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        self._staging_root = str(final_root / f".staging-{name}")
        staged = final_root / f".staging-{name}" / name
        try:
            with self.recipe.checkpointing(self.model, staged, write=self.args.should_save):
                super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = final_root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
            shutil.rmtree(final_root / f".staging-{name}", ignore_errors=True)
            rotate_checkpoints(output_dir=str(final_root), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    def _track_num_input_tokens(self, inputs):
        # Packed rows carry no attention mask (it would turn off per-example attention); the
        # collator's real-token mask stands in for it when counting tokens.
        if REAL_TOKENS_KEY in inputs:
            inputs = {**inputs, "attention_mask": inputs[REAL_TOKENS_KEY]}
        super()._track_num_input_tokens(inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for name, total in self._term_sums.items():
                logs[name] = float(total) / self._term_counts[name]
            self._term_sums.clear()
            self._term_counts.clear()
            logs.update(self.recipe.log_metrics(self.model))
            logs.update(self._throughput())
        super().log(logs, start_time)

    def _throughput(self) -> dict[str, float]:
        """Non-padding input tokens per second since the previous log, and peak memory so far."""
        now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
        last_time, last_tokens = self._rate_clock or (now, tokens)
        self._rate_clock = (now, tokens)
        values = {"tokens_per_s": (tokens - last_tokens) / max(now - last_time, 1e-9),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available():
            values["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return values


class _StartClock(TrainerCallback):
    """Starts the tokens/s clock when training (or a resumed run) begins, not when the Trainer is built."""

    def __init__(self, trainer: RecipeTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._rate_clock = (time.perf_counter(), state.num_input_tokens_seen)
