"""LoRA q/k/v projections as one autograd node on their shared input.

Attention feeds the same hidden states to q, k and v. As one node, x is saved once and
its gradient is accumulated in one buffer: each projection's kernel adds its
``dq·Wq + s·(dq·Bq)·Aq`` into the same dx, instead of three dx tensors summed by the
autograd engine.
"""

from __future__ import annotations

import torch

from .backend import Backend
from .lora_linear import BaseWeight, lora_group_backward, lora_group_forward


class LoraQKVFunction(torch.autograd.Function):
    """Inputs: x, then (A, B) of q, k and v; then their base weights, scales and the backend."""

    @staticmethod
    def forward(ctx, x, q_a, q_b, k_a, k_b, v_a, v_b,
                bases: tuple[BaseWeight, BaseWeight, BaseWeight], scales: tuple[float, float, float], backend: Backend):
        x2 = x.reshape(-1, x.shape[-1])
        pairs = ((q_a, q_b), (k_a, k_b), (v_a, v_b))
        outs = lora_group_forward(backend, x2, [(base.dense(), a, b, s) for base, (a, b), s in zip(bases, pairs, scales)])
        ctx.save_for_backward(x, q_a, q_b, k_a, k_b, v_a, v_b)
        ctx.bases, ctx.scales, ctx.backend = bases, scales, backend
        ctx.set_materialize_grads(False)  # a projection whose output got no gradient is skipped
        return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, *weights = ctx.saved_tensors
        projections = [(base.dense(), a, b, s) for base, a, b, s in zip(ctx.bases, weights[0::2], weights[1::2], ctx.scales)]
        dys = [None if d is None else d.reshape(-1, d.shape[-1]) for d in (dq, dk, dv)]
        dx, grads = lora_group_backward(ctx.backend, x.reshape(-1, x.shape[-1]), dys, projections, ctx.needs_input_grad[0])
        return (None if dx is None else dx.view(x.shape)), *[g for pair in grads for g in pair], None, None, None


def lora_qkv(x: torch.Tensor, q: tuple, k: tuple, v: tuple, backend: Backend = "torch") -> tuple[torch.Tensor, ...]:
    """(q, k, v) from one input; each projection is (BaseWeight, A, B, scale)."""
    outs = LoraQKVFunction.apply(x.to(q[0].dtype), q[1], q[2], k[1], k[2], v[1], v[2],
                                 (q[0], k[0], v[0]), (q[3], k[3], v[3]), backend)
    return tuple(out.to(x.dtype) for out in outs)
