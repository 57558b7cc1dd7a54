"""LoRA (Hu et al., 2021): frozen base, trainable low-rank update B·A scaled by alpha/r."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from pydantic import Field, field_validator

from tunelab.config.schema import Config, RecipeOptions
from tunelab.errors import UserError

from .base import Recipe, register


class TargetedOptions(RecipeOptions):
    """Options of every method that adapts chosen layers of the base."""

    # "all-linear" (every linear layer but the output head), a list of module-name
    # suffixes such as [q_proj, v_proj], or one regex matched against full module names.
    target_modules: str | Annotated[list[str], Field(min_length=1)] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _regex_compiles(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is neither 'all-linear' nor a valid regex ({exc}); fix the pattern") from None
        return value


class LoraOptions(TargetedOptions):
    r: Annotated[int, Field(ge=1)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None


@register
class Lora(Recipe):
    name = "lora"
    description = "Low-rank adapters on frozen weights; merges into the base."
    Options = LoraOptions
    artifact = "adapter"
    typical_trainable = "0.26% (r=8, all linear layers)"
    # LoraConfig switches that make a LoRA variant (rsLoRA: use_rslora, DoRA: use_dora).
    peft_flags: ClassVar[dict[str, bool]] = {}
    options: LoraOptions

    def peft_config(self) -> LoraConfig:
        """The PEFT config for these options and this variant's flags."""
        o = self.options
        return LoraConfig(
            **self.peft_flags,
            task_type="CAUSAL_LM",
            r=o.r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=o.target_modules,
            bias=o.bias,
            modules_to_save=o.modules_to_save,
        )

    def build(self, model: torch.nn.Module, config: Config) -> torch.nn.Module:
        return self.wrap(model, self.peft_config(), config)

    def wrap(self, model: torch.nn.Module, peft_config: PeftConfig, config: Config) -> torch.nn.Module:
        """``get_peft_model`` with a plain message when the target modules match nothing."""
        try:
            return get_peft_model(model, peft_config)
        except ValueError as exc:
            if "not found in the base model" in str(exc) or "No modules were targeted" in str(exc):
                raise UserError(
                    f"recipe.target_modules {self.options.target_modules!r} matched no module of "
                    f"{config.model.name_or_path}; use 'all-linear' or names such as [q_proj, v_proj]."
                ) from exc
            raise
