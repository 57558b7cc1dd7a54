"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form whose rank budget is reallocated during training.

Each adapted layer holds P·diag(E)·Q with ``init_r`` singular values. After every
optimizer step an importance score (smoothed sensitivity × uncertainty) ranks all
singular values of all layers, and the least important are zeroed until the total
budget follows a cubic schedule from ``init_r`` per layer down to ``target_r`` per
layer: flat for ``tinit`` steps, cubic decrease, then fixed for the last ``tfinal``
steps. An orthogonality penalty on P and Q is part of the loss.

Two things a plain trainer misses and this recipe does: ``update_and_allocate`` is
called after every optimizer step, while the gradients still exist (neither HF
Trainer nor TRL calls it), and the penalty reaches the optimizer (PEFT adds it to
``outputs.loss``, which HF Trainer back-propagates; TRL's SFTTrainer would drop it).
The final rank pattern is stored in the adapter config and the saved matrices are
cut to it, so the adapter reloads at its learned ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraLayer
from pydantic import Field, model_validator
from transformers import TrainerCallback

from tunelab.config.schema import Config
from tunelab.errors import UserError

from .base import register
from .lora import Lora, TargetedOptions


class AdaloraOptions(TargetedOptions):
    init_r: Annotated[int, Field(ge=1)] = 12
    target_r: Annotated[int, Field(ge=1)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # Steps before pruning starts / at the end with the final ranks fixed.
    # Unset: 10% and 20% of the run's optimizer steps.
    tinit: Annotated[int, Field(ge=0)] | None = None
    tfinal: Annotated[int, Field(ge=1)] | None = None
    delta_t: Annotated[int, Field(ge=1)] = 1
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.85
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.85
    orth_reg_weight: Annotated[float, Field(gt=0)] = 0.5

    @model_validator(mode="after")
    def _target_below_init(self) -> AdaloraOptions:
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r ({self.target_r}) is larger than init_r ({self.init_r}); AdaLoRA only prunes ranks, "
                "so set target_r <= init_r"
            )
        return self


def schedule(options: AdaloraOptions, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) for a run of ``total_steps``; a user error when no pruning phase fits."""
    tinit = options.tinit if options.tinit is not None else total_steps // 10
    tfinal = options.tfinal if options.tfinal is not None else max(1, total_steps // 5)
    if tinit + tfinal >= total_steps:
        raise UserError(
            f"recipe.tinit ({tinit}) + recipe.tfinal ({tfinal}) leave no pruning phase in a run of "
            f"{total_steps} optimizer steps; lower them so that tinit + tfinal < {total_steps}, or train longer."
        )
    return tinit, tfinal


def total_rank(model: torch.nn.Module) -> int:
    """Singular values the allocator keeps over all layers (all of them until it first prunes).

    Read from the allocator's rank pattern, not from nonzero values: E starts at zero.
    """
    config = model.peft_config["default"]
    if config.rank_pattern is None:
        return config.init_r * sum(len(m.lora_E) for m in model.modules() if isinstance(m, AdaLoraLayer))
    return sum(sum(mask) for mask in config.rank_pattern.values())


# Checkpointed with the adapter: the pattern of kept ranks and the smoothed importance estimates.
ALLOCATOR_FILE = "adalora_state.pt"
ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


class RankAllocation(TrainerCallback):
    """Run AdaLoRA's importance update and pruning after each optimizer step, before gradients are cleared."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # global_step still counts the steps before this one, which is what the PEFT schedule expects.
        model.base_model.update_and_allocate(state.global_step)


@register
class Adalora(Lora):
    name = "adalora"
    description = "SVD-form LoRA that prunes its rank budget from init_r to target_r by importance."
    Options = AdaloraOptions
    typical_trainable = "0.39% (init_r=12, all linear layers)"
    options: AdaloraOptions

    def check(self, config: Config) -> None:
        if config.training.max_steps is not None:
            schedule(self.options, config.training.max_steps)

    def adalora_config(self, total_steps: int) -> AdaLoraConfig:
        o = self.options
        tinit, tfinal = schedule(o, total_steps)
        return AdaLoraConfig(
            task_type="CAUSAL_LM",
            init_r=o.init_r,
            target_r=o.target_r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=o.target_modules,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=o.delta_t,
            beta1=o.beta1,
            beta2=o.beta2,
            orth_reg_weight=o.orth_reg_weight,
            total_step=total_steps,
        )

    def build(self, model: torch.nn.Module, config: Config) -> torch.nn.Module:
        return self.wrap(model, self.adalora_config(config.training.max_steps), config)

    def callbacks(self, config: Config) -> list[TrainerCallback]:
        return [RankAllocation()]

    def log_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        return {"adalora_total_rank": total_rank(model)}

    @contextlib.contextmanager
    def checkpointing(self, model: torch.nn.Module, directory: Path, write: bool) -> Iterator[None]:
        # PEFT saves an AdaLoRA adapter cut to its current rank pattern. A resumed run starts
        # from init_r ranks and cannot load that, and the masked ranks' A/B rows (which keep
        # training and can be unmasked again) would be lost: checkpoints keep every rank, and the
        # pattern and the allocator's smoothed importance estimates go in a file of their own.
        config = model.peft_config["default"]
        pattern, config.rank_pattern = config.rank_pattern, None
        try:
            yield
        finally:
            config.rank_pattern = pattern
        if write:
            allocator = model.base_model.rankallocator
            state = {"rank_pattern": pattern, **{name: getattr(allocator, name) for name in ALLOCATOR_STATE}}
            torch.save(state, directory / ALLOCATOR_FILE)

    def load_checkpoint_state(self, model: torch.nn.Module, directory: Path) -> None:
        path = directory / ALLOCATOR_FILE
        if not path.is_file():
            raise UserError(f"{directory} has no {ALLOCATOR_FILE} (AdaLoRA's rank allocation); it was written by an "
                            "older tunelab or is incomplete; resume from another checkpoint or start the run again.")
        state = torch.load(path, weights_only=True)
        model.peft_config["default"].rank_pattern = state.pop("rank_pattern")
        for name, value in state.items():
            setattr(model.base_model.rankallocator, name, value)
