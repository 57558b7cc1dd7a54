"""Fused LoRA linear: ``y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` with a backward that saves only ``x``.

PEFT runs a LoRA layer as four autograd nodes (base matmul, A, B, scale-and-add) and
keeps ``x·Aᵀ`` for the backward. Here one node does it all (the idea Unsloth and
Axolotl published): the small ``x·Aᵀ`` (N×r) is recomputed in the backward instead of
stored, the dense update ``B·A`` is never formed, and the frozen base weight is read
through a ``BaseWeight`` so a 4-bit base can be dequantized on demand (``qlora.py``).

One Triton kernel serves the forward and the input gradient, since both have the
shape ``out = X·M + s·L·R (+ C)``: forward ``X=x, M=Wᵀ, L=x·Aᵀ, R=Bᵀ``; backward
``X=dy, M=W, L=dy·B, R=A``. The low-rank term is added in the kernel's epilogue,
so the output is written once instead of three times (matmul, scale, add).
``lowrank_mm_torch`` is its plain-PyTorch reference and the CPU implementation.
"""

from __future__ import annotations

import torch

from .backend import Backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path needs nothing else
    triton = None


class BaseWeight:
    """A frozen base layer's weight as a dense (out, in) matrix, produced on demand."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def dense(self) -> torch.Tensor:
        return self.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


# --- the kernel ------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _lowrank_mm_kernel(
        x_ptr, m_ptr, l_ptr, r_ptr, c_ptr, out_ptr,
        M, N, K, R, scale,
        sxm, sxk, smk, smn, slm, slr, srr, srn, scm, scn, som, son,
        HAS_LOWRANK: tl.constexpr, ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # Grouped tile order: neighbouring programs share rows of X (better L2 reuse).
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = GROUP_M * tiles_n
        first_m = (pid // group) * GROUP_M
        size_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rm[:, None] < M, rn[None, :] < N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=row_ok & (kk[None, :] < K), other=0.0)
            b = tl.load(m_ptr + kk[:, None] * smk + rn[None, :] * smn, mask=(kk[:, None] < K) & col_ok, other=0.0)
            if WIDEN:  # interpreter only: its dot mishandles 16-bit floats; their products are exact in fp32
                a, b = a.to(tl.float32), b.to(tl.float32)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)

        if HAS_LOWRANK:  # epilogue: the low-rank term, rank padded to BLOCK_R (>= 16, the smallest dot)
            rr = tl.arange(0, BLOCK_R)
            lo = tl.load(l_ptr + rm[:, None] * slm + rr[None, :] * slr, mask=row_ok & (rr[None, :] < R), other=0.0)
            hi = tl.load(r_ptr + rr[:, None] * srr + rn[None, :] * srn, mask=(rr[:, None] < R) & col_ok, other=0.0)
            if WIDEN:
                lo, hi = lo.to(tl.float32), hi.to(tl.float32)
            if IEEE:
                acc += scale * tl.dot(lo, hi, input_precision="ieee")
            else:
                acc += scale * tl.dot(lo, hi)
        if ACCUMULATE:
            acc += tl.load(c_ptr + rm[:, None] * scm + rn[None, :] * scn, mask=row_ok & col_ok).to(tl.float32)
        tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty), mask=row_ok & col_ok)


def interpreted() -> bool:
    """Whether this module's kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and type(_lowrank_mm_kernel).__name__ == "InterpretedFunction"


def _tiles(dtype: torch.dtype) -> dict:
    if interpreted():  # small tiles: the interpreter runs each tile through numpy
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def lowrank_mm_triton(x: torch.Tensor, m: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None, scale: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``x·m + scale·lo·hi`` (no low-rank term when ``lo`` is None), added into ``out`` when given (Triton; any strides)."""
    rows, inner = x.shape
    cols, rank = m.shape[1], 0 if lo is None else lo.shape[1]
    if lo is None:  # pointers and strides are unused: HAS_LOWRANK is off
        lo, hi = x, m
    result = torch.empty(rows, cols, dtype=x.dtype, device=x.device) if out is None else out
    tiles = _tiles(x.dtype)
    grid = (triton.cdiv(rows, tiles["BLOCK_M"]) * triton.cdiv(cols, tiles["BLOCK_N"]),)
    _lowrank_mm_kernel[grid](
        x, m, lo, hi, result, result, rows, cols, inner, rank, float(scale),
        *x.stride(), *m.stride(), *lo.stride(), *hi.stride(), *result.stride(), *result.stride(),
        HAS_LOWRANK=rank > 0, ACCUMULATE=out is not None, IEEE=x.dtype == torch.float32, WIDEN=interpreted(),
        BLOCK_R=max(16, triton.next_power_of_2(rank)), GROUP_M=8, **tiles,
    )
    return result


def lowrank_mm_torch(x: torch.Tensor, m: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The reference and CPU path: ``x·m + scale·lo·hi`` (+ ``out``), added in place, no temporaries of the output's size."""
    result = torch.mm(x, m) if out is None else out.addmm_(x, m)
    return result if lo is None else result.addmm_(lo, hi, alpha=scale)


def lowrank_mm(backend: Backend, *args, **kwargs) -> torch.Tensor:
    return (lowrank_mm_triton if backend == "triton" else lowrank_mm_torch)(*args, **kwargs)


# --- LoRA forward and backward, shared by the linear, MLP and QKV functions ------
# A "group" is the projections that read the same input (q/k/v; gate/up; a single layer): their
# A matrices are stacked, so x·Aᵀ is one matmul, dA one matmul, and dx takes the low-rank terms
# of all of them in one product. Each projection is (W, A, B, scale) with W dense (out, in).

def lora_group_forward(backend: Backend, x: torch.Tensor, projections: list[tuple]) -> list[torch.Tensor]:
    """``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` for each projection of a 2-D ``x``; A and B are cast to x's dtype."""
    xa = x @ torch.cat([a for _, a, _, _ in projections]).to(x.dtype).t()  # N × (sum of ranks)
    outs, start = [], 0
    for w, a, b, scale in projections:
        rank = a.shape[0]
        outs.append(lowrank_mm(backend, x, w.t(), xa[:, start:start + rank], b.to(x.dtype).t(), scale))
        start += rank
    return outs


def lora_group_backward(backend: Backend, x: torch.Tensor, dys: list[torch.Tensor | None], projections: list[tuple],
                        need_dx: bool) -> tuple[torch.Tensor | None, list[tuple]]:
    """(dx, [(dA, dB) per projection]) from the saved input ``x`` alone (``x·Aᵀ`` is recomputed).

    A projection whose output received no gradient (``None`` in ``dys``) gets ``(None, None)``.
    """
    live = [(dy, p) for dy, p in zip(dys, projections) if dy is not None]
    if not live:
        return None, [(None, None)] * len(projections)
    a_cat = torch.cat([a for _, (_, a, _, _) in live]).to(x.dtype)
    xa = x @ a_cat.t()
    scaled_dyb, grad_b, start = [], [], 0
    for dy, (_, a, b, scale) in live:
        rank = a.shape[0]
        grad_b.append(torch.mm(dy.t(), xa[:, start:start + rank]).mul_(scale).to(b.dtype))  # (out×N)·(N×r)
        scaled_dyb.append((dy @ b.to(x.dtype)).mul_(scale))                                  # s·dy·B, N×r
        start += rank
    dyb = torch.cat(scaled_dyb, dim=1)
    grad_a = torch.mm(dyb.t(), x).split([a.shape[0] for _, (_, a, _, _) in live])           # (R×N)·(N×in)
    dx = None
    if need_dx:  # dy_0·W_0 + Σ s_i·(dy_i·B_i)·A_i, then + dy_i·W_i for the others
        # The Triton kernel can accumulate several 16-bit products in an fp32 dx, rounded once at the end.
        if backend == "triton" and len(live) > 1 and x.dtype != torch.float32:
            dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for i, (dy, (w, _, _, _)) in enumerate(live):
            dx = lowrank_mm(backend, dy, w, *((dyb, a_cat) if i == 0 else (None, None)), 1.0, out=dx)
        dx = dx.to(x.dtype)
    grads, per_projection = iter(zip(grad_a, grad_b)), []
    for dy, (_, a, _, _) in zip(dys, projections):
        grad_a_i, grad_b_i = next(grads) if dy is not None else (None, None)
        per_projection.append((None if grad_a_i is None else grad_a_i.to(a.dtype), grad_b_i))
    return dx, per_projection


class LoraLinearFunction(torch.autograd.Function):
    """One autograd node for a LoRA linear; saves x (A and B are parameters, kept anyway)."""

    @staticmethod
    def forward(ctx, x, a, b, base: BaseWeight, scale: float, backend: Backend):
        x2 = x.reshape(-1, x.shape[-1])
        (y,) = lora_group_forward(backend, x2, [(base.dense(), a, b, scale)])
        ctx.save_for_backward(x, a, b)
        ctx.base, ctx.scale, ctx.backend = base, scale, backend
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, a, b = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dx, [(grad_a, grad_b)] = lora_group_backward(ctx.backend, x2, [dy.reshape(-1, dy.shape[-1])],
                                                     [(ctx.base.dense(), a, b, ctx.scale)], ctx.needs_input_grad[0])
        return (None if dx is None else dx.view(x.shape)), grad_a, grad_b, None, None, None


def lora_linear(x: torch.Tensor, base: BaseWeight, a: torch.Tensor, b: torch.Tensor, scale: float,
                backend: Backend = "torch") -> torch.Tensor:
    """The fused LoRA linear on an input of any leading shape; output in x's dtype."""
    compute = base.dtype
    return LoraLinearFunction.apply(x.to(compute), a, b, base, scale, backend).to(x.dtype)


def lora_linear_reference(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain autograd, the way PEFT computes it: what the fused versions must equal."""
    return x @ w.t() + ((x @ a.t()) @ b.t()) * scale
