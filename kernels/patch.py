"""Swap the fused kernels into a PEFT model, and say what was swapped and why not the rest.

A PEFT LoRA layer qualifies when its one active adapter is plain LoRA: no dropout
(a dropout mask would have to be saved, which is what the kernels avoid), no bias,
no weight variant (DoRA's magnitude vector, GateRA's gate: no kernel covers them) and
a base that is ``nn.Linear`` or bitsandbytes 4-bit. Qualifying layers of a Llama-family
MLP become one SwiGLU block, q/k/v of an attention one shared-input block, the rest
single fused linears. The patch replaces ``forward`` on the layer instance only;
weights, ``state_dict`` and saving are untouched, and a layer whose adapters are
disabled, merged or switched falls back to PEFT's own forward at each call.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .backend import Backend, resolve
from .linear_ce import fused_lm_loss
from .lora_linear import lora_linear
from .lora_mlp import lora_mlp
from .lora_qkv import lora_qkv
from .qlora import base_weight

# Block classes whose forward is exactly down(silu(gate(x)) * up(x)), and attentions that
# call q_proj, k_proj, v_proj on the same hidden states.
MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
ATTENTION_CLASSES = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}
# Causal LMs whose forward is `loss_function(lm_head(hidden), labels)` with nothing in between
# (no logit soft-capping or scaling), so the head and loss can be fused.
LOSS_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
# LoRA layer classes tunelab knows by another name.
LAYER_NAMES = {"GatedLinear": "GateRA gate", "SVDLinear": "AdaLoRA SVD layer"}


@dataclass
class KernelReport:
    """What ``patch_model`` did: kept on the model as ``tunelab_kernels`` for the trainer."""

    mode: str
    backend: Backend | None
    patched: dict[str, str] = field(default_factory=dict)  # LoRA layer name -> "mlp" | "qkv" | "linear"
    refused: dict[str, str] = field(default_factory=dict)  # LoRA layer name -> why it keeps PEFT's forward
    loss_refusal: str = ""                                  # why the loss is not fused ("" = it is)
    off_reason: str = "training.kernels is off"
    causal_lm: torch.nn.Module | None = field(default=None, repr=False)

    def loss_context(self, active: bool) -> contextlib.AbstractContextManager:
        """The fused loss around one training forward, when this model has it."""
        if active and self.backend and not self.loss_refusal:
            return fused_lm_loss(self.causal_lm, self.backend)
        return contextlib.nullcontext()

    def describe(self) -> str:
        if self.backend is None:
            return f"tunelab: kernels off ({self.off_reason}): PEFT's own LoRA layers and the unfused loss"
        how = "Triton" if self.backend == "triton" else "PyTorch autograd; Triton is used on CUDA GPUs"
        kinds = defaultdict(int)
        for kind in self.patched.values():
            kinds[kind] += 1
        parts = [f"{kinds['mlp'] // 3} SwiGLU MLP blocks", f"{kinds['qkv'] // 3} q/k/v blocks", f"{kinds['linear']} single"]
        total = len(self.patched) + len(self.refused)
        lines = [f"tunelab: kernels {self.backend} ({how}): {len(self.patched)} of {total} LoRA layers fused "
                 f"({', '.join(parts)}); linear cross-entropy "
                 + ("fused" if not self.loss_refusal else f"not fused: {self.loss_refusal}")]
        by_reason = defaultdict(list)
        for name, reason in self.refused.items():
            by_reason[reason].append(name)
        for reason, names in by_reason.items():
            lines.append(f"tunelab: kernels: {len(names)} LoRA layers keep PEFT's forward: {reason}; e.g. {names[0]}")
        return "\n".join(lines)


def layer_refusal(layer: torch.nn.Module) -> str:
    """Why a PEFT LoRA layer cannot take the fused kernels ("" when it can)."""
    from peft.tuners.lora.bnb import Linear4bit
    from peft.tuners.lora.layer import Linear

    if type(layer) not in (Linear, Linear4bit):
        name = type(layer).__name__
        return f"{LAYER_NAMES.get(name, name)} (no kernel covers this layer type)"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters (the kernels take exactly one)"
    adapter = active[0]
    if adapter in layer.lora_variant:
        variant = type(layer.lora_variant[adapter]).__name__
        return f"{'DoRA' if 'Dora' in variant else variant} (no kernel covers this LoRA variant)"
    dropout = layer.lora_dropout[adapter]
    if not isinstance(dropout, torch.nn.Identity):
        return f"lora_dropout {dropout.p} > 0 (set recipe.dropout: 0 to fuse)"
    if layer.lora_bias.get(adapter) or getattr(layer.get_base_layer(), "bias", None) is not None:
        return "a bias (the kernels have none)"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out weights"
    if layer.get_base_layer().weight.ndim != 2 and type(layer) is Linear:
        return "a base weight that is not a matrix"
    return ""


def _parts(layer: torch.nn.Module, adapter: str) -> tuple | None:
    """(BaseWeight, A, B, scale) for the fused call now, or None when PEFT's forward must run
    (adapters disabled or merged, or another adapter than the one checked at patch time is active)."""
    if layer.disable_adapters or layer.merged or layer.active_adapters != [adapter]:
        return None
    return base_weight(layer.base_layer), layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter]


def _patch_linear(layer: torch.nn.Module, backend: Backend) -> None:
    original, adapter = layer.forward, layer.active_adapters[0]

    def forward(x, *args, **kwargs):
        parts = None if args or kwargs else _parts(layer, adapter)
        return original(x, *args, **kwargs) if parts is None else lora_linear(x, *parts, backend=backend)

    layer.forward = forward


def _patch_mlp(mlp: torch.nn.Module, backend: Backend) -> None:
    original, layers = mlp.forward, (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    adapters = [layer.active_adapters[0] for layer in layers]

    def forward(x):
        parts = [_parts(layer, adapter) for layer, adapter in zip(layers, adapters)]
        return original(x) if None in parts else lora_mlp(x, *parts, backend=backend)

    mlp.forward = forward


def _patch_qkv(attention: torch.nn.Module, backend: Backend) -> None:
    """The attention calls q_proj, k_proj, v_proj on one tensor: the first call computes all
    three in one node, the other two collect their outputs (matched by the input's identity)."""
    layers = (attention.q_proj, attention.k_proj, attention.v_proj)
    adapters = [layer.active_adapters[0] for layer in layers]
    pending: dict = {"x": None, "outs": {}}

    def forward_of(index: int):
        original = layers[index].forward

        def forward(x, *args, **kwargs):
            if args or kwargs:
                return original(x, *args, **kwargs)
            if pending["x"] is x and index in pending["outs"]:
                out = pending["outs"].pop(index)
                if not pending["outs"]:
                    pending["x"] = None
                return out
            parts = [_parts(layer, adapter) for layer, adapter in zip(layers, adapters)]
            if None in parts:
                return original(x)
            outs = lora_qkv(x, *parts, backend=backend)
            pending["x"], pending["outs"] = x, {i: out for i, out in enumerate(outs) if i != index}
            return outs[index]

        return forward

    for index, layer in enumerate(layers):
        layer.forward = forward_of(index)


def _loss_model(model: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
    """The causal LM whose head and loss can be fused, or why not."""
    from peft import PeftModel

    causal_lm = model
    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning:
            return None, "prompt-learning adapters keep the full-logits loss"
        causal_lm = model.get_base_model()
    model_type = getattr(getattr(causal_lm, "config", None), "model_type", None)
    if model_type not in LOSS_MODEL_TYPES or not type(causal_lm).__name__.endswith("ForCausalLM"):
        return None, f"model type {model_type} is not one whose logits go to the loss unchanged"
    head = causal_lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None, f"the output head is a {type(head).__name__}, not a plain bias-free linear"
    return causal_lm, ""


def patch_model(model: torch.nn.Module, mode: str, strategy: str = "ddp") -> KernelReport:
    """Patch ``model`` in place for ``training.kernels`` = ``mode``; the report is also kept on the model.

    Sharded strategies (FSDP, DeepSpeed) gather a module's weights when its own forward
    runs; the fused functions read A, B and the head's weight directly, so they stay off there.
    """
    from peft.tuners.lora.layer import LoraLayer

    report = KernelReport(mode=mode, backend=resolve(mode))
    model.tunelab_kernels = report
    if report.backend is not None and strategy != "ddp":
        report.backend, report.off_reason = None, f"distributed.strategy {strategy} shards the weights the kernels read"
    if report.backend is None:
        report.loss_refusal = report.off_reason
        return report
    backend = report.backend
    ok = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            reason = layer_refusal(module)
            if reason:
                report.refused[name] = reason
            else:
                ok[name] = module
    for name, module in model.named_modules():
        kind, children = None, ()
        if type(module).__name__ in MLP_CLASSES and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
            kind, children = "mlp", ("gate_proj", "up_proj", "down_proj")
        elif type(module).__name__ in ATTENTION_CLASSES:
            kind, children = "qkv", ("q_proj", "k_proj", "v_proj")
        names = [f"{name}.{child}" for child in children]
        if kind and all(n in ok for n in names):
            (_patch_mlp if kind == "mlp" else _patch_qkv)(module, backend)
            for n in names:
                report.patched[n] = kind
                del ok[n]
    for name, layer in ok.items():
        _patch_linear(layer, backend)
        report.patched[name] = "linear"
    report.causal_lm, report.loss_refusal = _loss_model(model)
    return report
