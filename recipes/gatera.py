"""GateRA (Ou et al., AAAI 2026, arXiv 2511.17582): token-aware gating of the adapter branch.

Formulation used here (per adapted linear layer, per token x)::

    g(x) = sigmoid(w·x + b)                 one scalar per token, from the layer's own input
    y    = W x + g(x) · Δ(x)                Δ = scaling·B A x (LoRA), or DoRA's full correction
    loss = LM loss + λ · mean over layers and real tokens of H(g),   H(g) = -g ln g - (1-g) ln(1-g)

The entropy term pushes each gate toward 0 (the token keeps the base behaviour)
or 1 (full adaptation), which is the paper's "near-binary, sparse" gating.
Defaults chosen by tunelab (the paper's values could not be confirmed from the
sources available when this was written): w = 0 and b = ``gate_init_bias`` = 0,
so every gate starts at 0.5 with zero entropy gradient and the task loss decides
the direction first; λ = ``entropy_weight`` = 0.01. Not confirmed either: the
exact gate input and parameterisation, how the paper averages the entropy, and its
main variant on HiRA's multiplicative update, which PEFT lacks and tunelab does
not implement (LoRA and DoRA hosts only).

Built on PEFT's LoRA layers: a ``LoraConfig`` subclass carries the two extra
options and maps ``nn.Linear`` to ``GatedLinear`` (PEFT's custom-module hook), so
PEFT's targeting, initialisation, DoRA and saving are reused; ``lora_gate`` is an
adapter layer name, so gates train and save with A and B. A gated adapter cannot
be merged: the gate depends on each token.

Loading: the saved ``adapter_config.json`` says ``"peft_type": "GATERA"`` so a
plain ``PeftModel.from_pretrained`` refuses it instead of loading the LoRA part
and silently dropping the gates; ``tunelab`` (``Recipe.load_artifact``) loads it
strictly, gates included.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora.layer import Linear as LoraLinear
from pydantic import Field
from safetensors.torch import load_file

from tunelab.errors import UserError

from .base import register
from .lora import Lora, LoraOptions

PEFT_TYPE_ON_DISK = "GATERA"
NEAR = 0.1  # a gate below NEAR counts as "near 0", above 1 - NEAR as "near 1"


@dataclasses.dataclass
class GateraConfig(LoraConfig):
    gate_init_bias: float = 0.0
    entropy_weight: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        self._register_custom_module({torch.nn.Linear: GatedLinear})


class GatedLinear(LoraLinear):
    """A PEFT LoRA linear layer whose adapter output is scaled by a per-token sigmoid gate."""

    adapter_layer_names = (*LoraLinear.adapter_layer_names, "lora_gate")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: GateraConfig, **kwargs: Any) -> None:
        if "lora_gate" not in self._modules:  # PEFT's update_layer already lists it among adapter layers
            self.lora_gate = torch.nn.ModuleDict()
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        # skip_init draws no random numbers, so LoRA's A matrices initialise exactly as in plain LoRA.
        gate = torch.nn.utils.skip_init(torch.nn.Linear, self.in_features, 1)
        torch.nn.init.zeros_(gate.weight)
        torch.nn.init.constant_(gate.bias, config.gate_init_bias)
        self.lora_gate[adapter_name] = gate
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None:
            raise ValueError("GateRA layers do not support mixed-adapter batches (adapter_names).")
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            x_adapter = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
            gate = torch.sigmoid(self.lora_gate[adapter](x_adapter))
            self.last_gate = gate  # read by the entropy regulariser and the gate statistics
            if adapter in self.lora_variant:  # DoRA: gate its whole correction to the base output
                delta = self.lora_variant[adapter].forward(self, active_adapter=adapter, x=x_adapter, result=result) - result
            else:
                lora = self.lora_B[adapter](self.lora_A[adapter](self.lora_dropout[adapter](x_adapter)))
                delta = lora * self.scaling[adapter]
            result = result + gate * delta
        return result.to(out_dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError("a GateRA adapter cannot be merged: its gate depends on each input token.")

    def __repr__(self) -> str:
        return "gatera." + super().__repr__()


def gated_layers(model: torch.nn.Module) -> list[GatedLinear]:
    return [m for m in model.modules() if isinstance(m, GatedLinear)]


def binary_entropy(g: torch.Tensor) -> torch.Tensor:
    g = g.clamp(1e-6, 1 - 1e-6)
    return -(g * g.log() + (1 - g) * (1 - g).log())


def token_gates(layer: GatedLinear, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The last forward's gates of one layer at real (non-padding) tokens, flattened."""
    gates = layer.last_gate.squeeze(-1)
    if attention_mask is not None and attention_mask.shape == gates.shape:
        return gates[attention_mask.bool()]
    return gates.reshape(-1)


class GateraOptions(LoraOptions):
    entropy_weight: Annotated[float, Field(ge=0)] = 0.01
    gate_init_bias: float = 0.0
    # Gate DoRA's branch instead of plain LoRA's (the paper applies the gate to LoRA, DoRA and HiRA).
    use_dora: bool = False


@register
class Gatera(Lora):
    name = "gatera"
    description = "LoRA whose update is scaled per token by a learned sigmoid gate, with an entropy penalty."
    Options = GateraOptions
    merge_refusal = (
        "its gate depends on each token, so no exact merge into fixed weights exists; serve the adapter instead (tunelab generate RUN)."
    )
    typical_trainable = "0.26% (r=8, all linear layers; gates add in_features+1 per layer)"
    options: GateraOptions

    def __init__(self, options: GateraOptions):
        super().__init__(options)
        # [sum of gates, gates near 0, gates near 1, gate count] since the last log, kept on the
        # gates' device so the training step never waits for a host copy.
        self._stats: torch.Tensor | None = None

    def peft_config(self) -> GateraConfig:
        o = self.options
        lora = super().peft_config()
        fields = {f.name: getattr(lora, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
        return GateraConfig(
            **{**fields, "use_dora": o.use_dora},
            gate_init_bias=o.gate_init_bias,
            entropy_weight=o.entropy_weight,
        )

    def loss_terms(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = inputs.get("attention_mask")
        per_layer = []
        for layer in gated_layers(model):
            if layer.last_gate is None:
                continue
            gates = token_gates(layer, mask)
            per_layer.append(binary_entropy(gates).mean())
            with torch.no_grad():
                counts = torch.stack([gates.sum(), (gates < NEAR).sum(), (gates > 1 - NEAR).sum(),
                                      torch.tensor(gates.numel(), device=gates.device)]).double()
                self._stats = counts if self._stats is None else self._stats + counts
        if not per_layer or self.options.entropy_weight == 0:
            return {}
        return {"gate_entropy_loss": self.options.entropy_weight * torch.stack(per_layer).mean()}

    def log_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        if self._stats is None or not self._stats[3]:
            return {}
        total, near_0, near_1, count = self._stats.tolist()
        self._stats = None
        return {"gate_mean": total / count, "gate_near_0": near_0 / count, "gate_near_1": near_1 / count}

    def save(self, model: torch.nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().save(model, directory, state_dict)
        config_path = directory / "adapter_config.json"
        saved = json.loads(config_path.read_text())
        saved["peft_type"] = PEFT_TYPE_ON_DISK
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")

    def load_artifact(self, base: torch.nn.Module, directory: Path) -> torch.nn.Module:
        saved = json.loads((directory / "adapter_config.json").read_text())
        if saved.get("peft_type") != PEFT_TYPE_ON_DISK:
            raise UserError(f"{directory} is not a GateRA adapter (peft_type {saved.get('peft_type')!r}).")
        known = {f.name for f in dataclasses.fields(GateraConfig) if f.init} - {"peft_type"}
        config = GateraConfig(**{k: v for k, v in saved.items() if k in known})
        config.inference_mode = True
        model = get_peft_model(base, config)
        weights = load_file(directory / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, weights)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise UserError(
                f"{directory} does not fit this base model (unexpected {result.unexpected_keys[:2]}, "
                f"missing {missing[:2]}); load it onto the model it was trained from."
            )
        return model.eval()
