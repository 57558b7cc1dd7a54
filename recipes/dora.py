"""DoRA (Liu et al., 2024): weight-decomposed LoRA.

Each adapted weight is split into a per-output-channel magnitude vector and a
direction; LoRA updates the direction and the magnitudes train directly. Adds one
trainable vector of size out_features per adapted layer to LoRA's count.
"""

from __future__ import annotations

from .base import register
from .lora import Lora


@register
class Dora(Lora):
    name = "dora"
    description = "LoRA plus trainable per-channel magnitudes (weight decomposition); merges."
    peft_flags = {"use_dora": True}
    typical_trainable = "0.28% (r=8, all linear layers)"
