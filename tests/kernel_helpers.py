"""Shared by the kernel tests: small LoRA models, PEFT twins, error measures, saved-activation bytes."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from torch import nn


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| (in fp32)."""
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def llama_mlp(dim: int, inter: int, dtype=torch.float32) -> nn.Module:
    """transformers' own SwiGLU MLP block (gate, up, down, SiLU)."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    config = LlamaConfig(hidden_size=dim, intermediate_size=inter, hidden_act="silu", num_attention_heads=1, num_key_value_heads=1,
                         head_dim=2)  # attention settings only satisfy the validation of odd widths
    return LlamaMLP(config).to(dtype)


class LlamaAttention(nn.Module):  # only its q/k/v calls matter here
    def __init__(self, dim: int, kv: int, dtype=torch.float32):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(dim, kv, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(dim, kv, bias=False, dtype=dtype)

    def forward(self, x):  # any mix of q, k and v that is well conditioned (no long sums that cancel)
        kv = self.k_proj(x) * self.v_proj(x)
        return self.q_proj(x) + torch.nn.functional.pad(kv, (0, self.q_proj.out_features - kv.shape[-1]))


class Block(nn.Module):
    """q/k/v + an o projection + a SwiGLU MLP: every kind of fused LoRA layer."""

    def __init__(self, dim: int = 45, inter: int = 77, kv: int = 21, dtype=torch.float32):
        super().__init__()
        self.self_attn = LlamaAttention(dim, kv, dtype)
        self.o_proj = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.mlp = llama_mlp(dim, inter, dtype)

    def forward(self, x):
        h = self.o_proj(x) + self.self_attn(x)
        return self.mlp(h)


def peft_block(r: int = 5, dtype=torch.float32, seed: int = 0, dims: tuple[int, int, int] = (45, 77, 21), **lora) -> nn.Module:
    """A PEFT-wrapped ``Block`` (hidden, MLP, k/v widths ``dims``) with non-zero B (so every gradient is exercised)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r + 1, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], **lora)
    return get_peft_model(Block(*dims, dtype=dtype), config, autocast_adapter_dtype=False)


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def saved_activation_bytes(run, model: nn.Module):
    """(result of ``run()``, bytes of distinct non-parameter storages autograd saved for the backward)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(seen.values())
