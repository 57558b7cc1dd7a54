"""QLoRA (Dettmers et al., 2023): LoRA on a base frozen in 4-bit NormalFloat.

The base linears load as bitsandbytes ``Linear4bit`` (NF4 by default, with double
quantization of the quantization constants), which cuts the base's weight memory
about 4x against bf16. Before the adapters are added the model goes through PEFT's
k-bit training preparation (norms and other small weights in fp32, inputs that
carry gradients for checkpointing): TRL's SFTTrainer leaves that step to the user.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch
from peft import prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

from tunelab.config.schema import Config
from tunelab.errors import UserError
from tunelab.models.load import resolve_dtype

from .base import register
from .lora import Lora, LoraOptions


class QloraOptions(LoraOptions):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # Dtype the 4-bit weights are dequantized to for each matmul; "auto" = bf16 on a GPU that has it, else fp32.
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@register
class Qlora(Lora):
    name = "qlora"
    description = "LoRA on a 4-bit NF4-quantized frozen base (bitsandbytes); ~4x less base memory."
    Options = QloraOptions
    typical_trainable = "0.26% (r=8, all linear layers)"
    options: QloraOptions

    def check(self, config: Config) -> None:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(
                'recipe "qlora" loads the base in 4 bit with bitsandbytes, which is not installed; '
                'run pip install "tunelab[quant]" (or choose recipe lora).'
            )

    def load_kwargs(self, config: Config) -> dict[str, Any]:
        o = self.options
        return {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=o.quant_type,
                bnb_4bit_use_double_quant=o.double_quant,
                bnb_4bit_compute_dtype=resolve_dtype(o.compute_dtype),
            )
        }

    def build(self, model: torch.nn.Module, config: Config) -> torch.nn.Module:
        if not getattr(model, "is_loaded_in_4bit", False):
            raise UserError(f'recipe "qlora" expected {config.model.name_or_path} to load in 4 bit, but it did not.')
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.training.gradient_checkpointing
        )
        return self.wrap(model, self.peft_config(), config)
