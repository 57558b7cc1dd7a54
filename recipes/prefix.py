"""Prefix tuning (Li & Liang, 2021): trained key/value vectors prepended at every layer.

The base is untouched; each attention layer attends to ``num_virtual_tokens``
learned key/value pairs before the real tokens. With ``projection`` the prefixes
come from a small MLP over an embedding (the paper's reparameterisation, also
what P-tuning v2 calls deep prompt tuning with reparameterisation); without it
they are trained directly. Nothing can be merged: the prefix is extra input.
"""

from __future__ import annotations

from typing import Annotated

import torch
from peft import PeftConfig, PrefixTuningConfig, get_peft_model
from pydantic import Field

from tunelab.config.schema import Config, RecipeOptions
from tunelab.errors import UserError

from .base import Recipe, register


class PrefixOptions(RecipeOptions):
    num_virtual_tokens: Annotated[int, Field(ge=1)] = 20
    projection: bool = False
    # Width of the projection MLP (used only with projection: true).
    encoder_hidden_size: Annotated[int, Field(ge=1)] = 512


class PromptLearning(Recipe):
    """Methods that feed the base learned extra input (prefix tuning, P-tuning) through PEFT."""

    artifact = "adapter"

    def peft_config(self) -> PeftConfig:
        raise NotImplementedError

    def check(self, config: Config) -> None:
        """Rows must hold one example each (the virtual tokens belong to it) and layers must not be re-run."""
        if config.data.packing:
            raise UserError(
                f'recipe "{self.name}" cannot train on packed rows (its virtual tokens would be shared by every example '
                "of a row); set data.packing: false."
            )
        if config.training.gradient_checkpointing:
            raise UserError(
                f'recipe "{self.name}" does not work with training.gradient_checkpointing (the re-run layers lose the '
                "learned prefix); set training.gradient_checkpointing: false — these adapters are small anyway."
            )

    def build(self, model: torch.nn.Module, config: Config) -> torch.nn.Module:
        return get_peft_model(model, self.peft_config())


@register
class Prefix(PromptLearning):
    name = "prefix"
    description = "Learned key/value prefixes at every attention layer; base untouched, not mergeable."
    Options = PrefixOptions
    merge_refusal = (
        "prefix tuning adds learned keys and values as extra input at every layer, and there is no weight to fold "
        "them into; serve the adapter instead (tunelab generate RUN, or PEFT)."
    )
    typical_trainable = "0.016% (20 virtual tokens)"
    options: PrefixOptions

    def peft_config(self) -> PrefixTuningConfig:
        o = self.options
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=o.num_virtual_tokens,
            prefix_projection=o.projection,
            encoder_hidden_size=o.encoder_hidden_size,
        )
