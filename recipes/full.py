"""Full fine-tuning: every weight of the base model is trained.

Memory-lean optimizers from bitsandbytes are picked with ``training.optimizer``
(``adamw_bnb_8bit`` everywhere, ``paged_adamw_8bit``/``paged_adamw_32bit`` on CUDA).
"""

from __future__ import annotations

import torch

from tunelab.config.schema import Config, RecipeOptions

from .base import Recipe, register


class FullOptions(RecipeOptions):
    pass


@register
class Full(Recipe):
    name = "full"
    description = "Train every weight; the result is a complete model."
    Options = FullOptions
    artifact = "model"
    typical_trainable = "100%"

    def build(self, model: torch.nn.Module, config: Config) -> torch.nn.Module:
        model.requires_grad_(True)
        return model
