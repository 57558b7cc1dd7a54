"""Fused linear cross-entropy: the LM head and the loss in chunks of rows, never the full logits.

The unfused loss materializes logits for every position (N×V; 8192 tokens × 128k vocab
is 2 GB in bf16, then 4 GB more as fp32), the log-softmax, and a gradient of the same
size. Here rows whose label is ignored (-100: prompt tokens, padding) are dropped first,
then for each chunk of the remaining rows the logits are computed, turned into the
loss and, in the same pass, into their gradient ``(softmax − onehot)/denominator``,
which is immediately multiplied back into dH (and dW when the head trains). Only
dH (N×D, the size of the hidden states) outlives the chunk. Gradients are computed in
the forward (the approach Liger-Kernel published), so the backward only scales them.

Numerics follow transformers' ``ForCausalLMLoss``: logits in the model's dtype,
softmax in fp32, the sum divided by ``num_items_in_batch`` when the Trainer passes it
(gradient accumulation) and by the number of labelled tokens otherwise.

``fused_lm_loss`` puts this behind a Hugging Face causal LM's normal forward: a
pre-hook on the head keeps its input (the final hidden states) and hands the head an
empty slice, and the model's ``loss_function`` is replaced for the duration. The rest
of the call (PEFT, DDP, AdaLoRA's regulariser on ``outputs.loss``) is unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .backend import Backend
from .lora_linear import triton

IGNORE_INDEX = -100

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _cross_entropy_kernel(logits_ptr, row_stride, labels_ptr, loss_ptr, V, scale, BLOCK_V: tl.constexpr):
        """One row: loss = logsumexp − logit[label]; the row is overwritten with its gradient."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        label = tl.load(labels_ptr + row)
        cols = tl.arange(0, BLOCK_V)
        m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
        for v0 in range(0, V, BLOCK_V):  # online logsumexp: one read of the row
            x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(loss_ptr + row, lse - tl.load(base + label).to(tl.float32))
        for v0 in range(0, V, BLOCK_V):
            x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(v0 + cols == label, 1.0, 0.0)
            tl.store(base + v0 + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=v0 + cols < V)


def cross_entropy_rows_triton(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp32 loss, and ``scale·(softmax − onehot)`` written over ``logits`` (rows all labelled)."""
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    block = min(8192, triton.next_power_of_2(logits.shape[1]))
    _cross_entropy_kernel[(logits.shape[0],)](logits, logits.stride(0), labels, loss, logits.shape[1], float(scale),
                                              BLOCK_V=block, num_warps=8)
    return loss, logits


def cross_entropy_rows_torch(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference and CPU path of the kernel above (``logits`` may be overwritten)."""
    probs = logits.float()
    lse = torch.logsumexp(probs, dim=-1)
    loss = lse - probs.gather(1, labels[:, None]).squeeze(1)
    probs.sub_(lse[:, None]).exp_()
    probs[torch.arange(len(labels), device=labels.device), labels] -= 1.0
    return loss, probs.mul_(scale).to(logits.dtype)


def chunk_rows(vocab: int, device_type: str = "cuda") -> int:
    """Rows per chunk, at least 16: about 32 M logits (128 MB in fp32) at a time on a GPU, 4 M (16 MB) on a CPU.

    A GPU needs large matmuls to stay busy. A CPU's matmuls are already efficient at a few
    hundred rows, and there each chunk's fp32 logits, their gradient and its 16-bit copy are
    fresh heap memory that the allocator keeps afterwards. Measured on the vs_trl benchmark
    (vocab 32000, ``--levers``): 1024-row chunks had 1.19x the peak RSS of 128-row chunks and
    0.90x their speed.
    """
    budget = 2**22 if device_type == "cpu" else 2**25
    return max(16, 2 ** int(math.log2(max(1, budget // vocab))))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, rows, denominator: float, backend: Backend, chunk: int,
                need_dh: bool, need_dw: bool):
        scale = 1.0 / denominator if denominator else 0.0
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.zeros_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        rows_ce = cross_entropy_rows_triton if backend == "triton" else cross_entropy_rows_torch
        for start in range(0, rows.numel(), chunk):
            index = rows[start:start + chunk]
            h = hidden.index_select(0, index)
            loss, grad = rows_ce(h @ weight.t(), labels.index_select(0, index), scale)
            total += loss.sum()
            if need_dh:
                dh.index_copy_(0, index, grad @ weight)
            if need_dw:
                dw.add_(grad.t() @ h)
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
        return total / denominator  # no labelled rows and no num_items_in_batch: 0/0 = nan, like the unfused mean

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * grad_loss.to(dh.dtype),
                None if dw is None else dw * grad_loss.to(dw.dtype), *[None] * 7)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                         backend: Backend = "torch", chunk: int | None = None) -> torch.Tensor:
    """``cross_entropy(hidden·Wᵀ, labels)`` over labelled rows without the full logits.

    ``hidden`` (..., D) and ``labels`` (...) are already aligned (shifted). The sum of the
    row losses is divided by ``num_items_in_batch`` when given, else by the number of
    labelled rows: exactly transformers' ``fixed_cross_entropy``.
    """
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    labels1 = labels.reshape(-1).to(hidden.device)
    rows = (labels1 != ignore_index).nonzero().squeeze(1)
    denominator = float(num_items_in_batch) if num_items_in_batch is not None else float(rows.numel())
    grad_on = torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(
        hidden2, weight, labels1, rows, denominator, backend, chunk or chunk_rows(weight.shape[0], hidden.device.type),
        grad_on and hidden2.requires_grad, grad_on and weight.requires_grad,
    )


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch=None, ignore_index: int = IGNORE_INDEX, shift_labels: torch.Tensor | None = None,
                   backend: Backend = "torch") -> torch.Tensor:
    """``ForCausalLMLoss`` on hidden states: labels shifted left by one, the last position unlabelled."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if shift_labels.numel() * hidden.shape[-1] != hidden.numel():
        raise RuntimeError(f"fused loss: {tuple(hidden.shape)} hidden states for {tuple(shift_labels.shape)} labels")
    return linear_cross_entropy(hidden, weight, shift_labels, num_items_in_batch, ignore_index, backend)


@contextlib.contextmanager
def fused_lm_loss(causal_lm: torch.nn.Module, backend: Backend) -> Iterator[None]:
    """While active, ``causal_lm(..., labels=...)`` computes its loss fused; its logits come back empty."""
    head = causal_lm.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def keep_hidden(module, args):
        captured.append(args[0])
        return (args[0][..., :0, :],)  # the head computes (B, 0, V): nothing

    def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=IGNORE_INDEX,
                      shift_labels=None, **kwargs):
        return causal_lm_loss(captured.pop(), head.weight, labels, num_items_in_batch, ignore_index, shift_labels, backend)

    previous = causal_lm.__dict__.get("_loss_function")
    handle = head.register_forward_pre_hook(keep_hidden)
    causal_lm.loss_function = loss_function
    try:
        yield
    finally:
        handle.remove()
        if previous is None:
            del causal_lm._loss_function
        else:
            causal_lm.loss_function = previous
