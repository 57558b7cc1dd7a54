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
from peft import PrefixTuningConfig, get_peft_model
from pydantic import Field

from tunelab.config.schema import Config, RecipeOptions
from tunelab.errors import UserError

from .base import Recipe, register


class PrefixOptions(RecipeOptions):
    num_virtual_tokens: Annotated[int, Field(ge=1)] = 20
    projection: bool = False
    # Width of the projection MLP (used only with projection: true).
    encoder_hidden_size: Annotated[int, Field(ge=1)] = 512


def check_prompt_learning(recipe: str, config: Config) -> None:
    """Prompt-learning adapters need one contiguous sequence per row and un-checkpointed layers."""
    if config.data.packing:
        raise UserError(
            f'recipe "{recipe}" cannot train on packed rows (its virtual tokens would be shared by every example '
            "of a row); set data.packing: false."
        )
    if config.training.gradient_checkpointing:
        raise UserError(
            f'recipe "{recipe}" does not work with training.gradient_checkpointing (the re-run layers lose the '
            "learned prefix); set training.gradient_checkpointing: false — these adapters are small anyway."
        )


@register
class Prefix(Recipe):
    name = "prefix"
    description = "Learned key/value prefixes at every attention layer; base untouched, not mergeable."
    Options = PrefixOptions
    artifact = "adapter"
    mergeable = False
    merge_refusal = (
        "prefix tuning adds learned keys and values as extra input at every layer, and there is no weight to fold them into; serve the adapter instead (tunelab generate RUN, or PEFT)."
    )
    typical_trainable = "0.016% (20 virtual tokens)"
    options: PrefixOptions

    def check(self, config: Config) -> None:
        check_prompt_learning(self.name, config)

    def build(self, model: torch.nn.Module, config: Config) -> torch.nn.Module:
        o = self.options
        return get_peft_model(
            model,
            PrefixTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=o.num_virtual_tokens,
                prefix_projection=o.projection,
                encoder_hidden_size=o.encoder_hidden_size,
            ),
        )
