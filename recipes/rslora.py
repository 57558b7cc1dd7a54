"""rsLoRA (Kalajdzievski, 2023): LoRA scaled by alpha/sqrt(r) instead of alpha/r.

With alpha/r the update shrinks as the rank grows, so high ranks learn no better
than low ones; alpha/sqrt(r) keeps the update's size stable across ranks.
"""

from __future__ import annotations

from .base import register
from .lora import Lora


@register
class RsLora(Lora):
    name = "rslora"
    description = "LoRA with rank-stabilised scaling alpha/sqrt(r); pick high ranks safely."
    peft_flags = {"use_rslora": True}
    typical_trainable = "0.26% (r=8, all linear layers)"
