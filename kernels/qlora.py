"""QLoRA base weights: a bitsandbytes 4-bit (NF4/FP4) matrix dequantized on demand.

The fused LoRA functions read the base weight through ``BaseWeight.dense()``. For a
4-bit base this dequantizes into a temporary in the compute dtype, once in the
forward and again in the backward; the dense copy is dropped right after each
matmul and never saved for the backward, so a 4-bit model keeps its 4-bit footprint
while training. (bitsandbytes' own ``matmul_4bit`` does the same for the base alone.)
"""

from __future__ import annotations

import torch

from .lora_linear import BaseWeight


class Nf4Weight(BaseWeight):
    """The weight of a ``bnb.nn.Linear4bit``, dequantized to its compute dtype at each use."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.compute_dtype or torch.float32

    def dense(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        weight = self.layer.weight
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(self.dtype)


def is_4bit(layer: torch.nn.Module) -> bool:
    return type(layer).__name__ == "Linear4bit" and hasattr(layer.weight, "quant_state")


def base_weight(layer: torch.nn.Module) -> BaseWeight:
    """The right ``BaseWeight`` for a PEFT LoRA layer's base (``nn.Linear`` or 4-bit)."""
    return Nf4Weight(layer) if is_4bit(layer) else BaseWeight(layer.weight)
