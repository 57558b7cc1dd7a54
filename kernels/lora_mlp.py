"""LoRA SwiGLU MLP block (Llama family): ``down(silu(gate(x)) * up(x))`` as one autograd node.

PEFT keeps, per MLP, x, two low-rank intermediates, gate(x), silu(gate(x)), up(x),
their product and a third intermediate. This block keeps x, gate(x) and up(x) only:
the product ``h = silu(e)·g`` (the down projection's input) is recomputed in the
backward by one elementwise pass, and the activation's forward and backward are each
one fused kernel (Triton) or a few in-place ops (PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import Backend
from .lora_linear import BaseWeight, lora_group_backward, lora_group_forward, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _swiglu_forward_kernel(e_ptr, g_ptr, h_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = e * tl.sigmoid(e) * g
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(dh_ptr, e_ptr, g_ptr, de_ptr, dg_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(e)
        silu = e * sig
        # d silu(e)/de = sig·(1 + e·(1 − sig))
        tl.store(de_ptr + offs, (dh * g * sig * (1.0 + e * (1.0 - sig))).to(de_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + offs, (dh * silu).to(dg_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


def swiglu_forward(backend: Backend, e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``silu(e)·g`` (e and g contiguous, same shape)."""
    if backend == "torch":
        return F.silu(e).mul_(g)
    h = torch.empty_like(e)
    _swiglu_forward_kernel[(triton.cdiv(e.numel(), _BLOCK),)](e, g, h, e.numel(), BLOCK=_BLOCK)
    return h


def swiglu_backward(backend: Backend, dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(de, dg) of ``h = silu(e)·g`` given dh."""
    if backend == "torch":  # PyTorch's own fused silu backward: dh·g·sig·(1 + e·(1 − sig)) in one pass
        return torch.ops.aten.silu_backward(dh * g, e), F.silu(e).mul_(dh)
    de, dg = torch.empty_like(e), torch.empty_like(g)
    _swiglu_backward_kernel[(triton.cdiv(e.numel(), _BLOCK),)](dh.contiguous(), e, g, de, dg, e.numel(), BLOCK=_BLOCK)
    return de, dg


class LoraMLPFunction(torch.autograd.Function):
    """Inputs: x, then (A, B) of gate, up and down; then their base weights, scales and the backend."""

    @staticmethod
    def forward(ctx, x, gate_a, gate_b, up_a, up_b, down_a, down_b,
                bases: tuple[BaseWeight, BaseWeight, BaseWeight], scales: tuple[float, float, float], backend: Backend):
        x2 = x.reshape(-1, x.shape[-1])
        gate, up, down = bases
        e, g = lora_group_forward(backend, x2, [(gate.dense(), gate_a, gate_b, scales[0]), (up.dense(), up_a, up_b, scales[1])])
        (y,) = lora_group_forward(backend, swiglu_forward(backend, e, g), [(down.dense(), down_a, down_b, scales[2])])
        ctx.save_for_backward(x, e, g, gate_a, gate_b, up_a, up_b, down_a, down_b)
        ctx.bases, ctx.scales, ctx.backend = bases, scales, backend
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, e, g, gate_a, gate_b, up_a, up_b, down_a, down_b = ctx.saved_tensors
        gate, up, down = ctx.bases
        (s_gate, s_up, s_down), backend = ctx.scales, ctx.backend
        h = swiglu_forward(backend, e, g)  # recomputed, not stored
        dh, [(grad_down_a, grad_down_b)] = lora_group_backward(
            backend, h, [dy.reshape(-1, dy.shape[-1])], [(down.dense(), down_a, down_b, s_down)], need_dx=True)
        del h
        de, dg = swiglu_backward(backend, dh, e, g)
        del dh
        dx, [(grad_gate_a, grad_gate_b), (grad_up_a, grad_up_b)] = lora_group_backward(
            backend, x.reshape(-1, x.shape[-1]), [de, dg],
            [(gate.dense(), gate_a, gate_b, s_gate), (up.dense(), up_a, up_b, s_up)], ctx.needs_input_grad[0])
        return ((None if dx is None else dx.view(x.shape)), grad_gate_a, grad_gate_b, grad_up_a, grad_up_b,
                grad_down_a, grad_down_b, None, None, None)


def lora_mlp(x: torch.Tensor, gate: tuple, up: tuple, down: tuple, backend: Backend = "torch") -> torch.Tensor:
    """The fused block; ``gate``, ``up``, ``down`` are each (BaseWeight, A, B, scale)."""
    bases = (gate[0], up[0], down[0])
    return LoraMLPFunction.apply(x.to(gate[0].dtype), gate[1], gate[2], up[1], up[2], down[1], down[2],
                                 bases, (gate[3], up[3], down[3]), backend).to(x.dtype)


def lora_mlp_reference(x, gate, up, down):
    """Plain autograd with dense weights: (W, A, B, scale) per projection."""
    def lin(inp, w, a, b, s):
        return inp @ w.t() + ((inp @ a.t()) @ b.t()) * s
    return lin(F.silu(lin(x, *gate)) * lin(x, *up), *down)
