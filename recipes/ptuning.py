"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): trained soft prompt made by a prompt encoder.

``num_virtual_tokens`` embeddings pass through a small MLP or LSTM (the prompt
encoder, which the paper found makes optimisation stable) and are prepended to
the input embeddings. Only the encoder and its embeddings train; the loss and
the logits of the virtual positions are dropped by PEFT. For the deep variant
(P-tuning v2: prompts at every layer) use recipe ``prefix`` with ``projection``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from peft import PromptEncoderConfig
from pydantic import Field

from tunelab.config.schema import RecipeOptions

from .base import register
from .prefix import PromptLearning


class PtuningOptions(RecipeOptions):
    num_virtual_tokens: Annotated[int, Field(ge=1)] = 20
    encoder: Literal["MLP", "LSTM"] = "MLP"
    # Unset: the model's hidden size (PEFT's default).
    encoder_hidden_size: Annotated[int, Field(ge=1)] | None = None
    encoder_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0


@register
class Ptuning(PromptLearning):
    name = "ptuning"
    description = "Soft prompt produced by a trained MLP/LSTM prompt encoder; base untouched, not mergeable."
    Options = PtuningOptions
    merge_refusal = (
        "P-tuning prepends a learned soft prompt to the input, and there is no weight to fold it into; "
        "serve the adapter instead (tunelab generate RUN, or PEFT)."
    )
    typical_trainable = "0.63% (20 virtual tokens, MLP encoder of hidden size)"
    options: PtuningOptions

    def peft_config(self) -> PromptEncoderConfig:
        o = self.options
        return PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=o.num_virtual_tokens,
            encoder_reparameterization_type=o.encoder,
            encoder_hidden_size=o.encoder_hidden_size,
            encoder_dropout=o.encoder_dropout,
        )
