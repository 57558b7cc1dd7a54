"""Fused kernels vs PEFT: forward+backward time, TFLOP/s, peak memory, ratio; correctness checked first.

On a CUDA GPU (compiled Triton): Llama-3-8B-shaped LoRA layers (4096→4096, 4096→14336, 14336→4096),
the q/k/v block (4096→4096/1024/1024) and the SwiGLU MLP block, rank 16, 8192 tokens, bf16; then the
fused linear cross-entropy vs the unfused one (vocab 128256, frozen head as in LoRA training).
Without CUDA, or with --cpu: the same cases scaled down, in fp32, PyTorch path vs PEFT.

    python bench/kernels.py            # GPU when there is one
    python bench/kernels.py --cpu      # the CPU version (about a minute on 2 cores)
    TRITON_INTERPRET=1 python bench/kernels.py --smoke   # tiny shapes, Triton interpreted: the script itself works

Each case first compares the fused result (output and every gradient) with PEFT's and with an fp32
evaluation of the same weights, and prints FAIL when the fused error is out of bounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

# This file is named kernels.py and Python puts its folder first on sys.path, where it would shadow the
# PyPI `kernels` package that transformers imports; take the folder off before importing anything else.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import tunelab  # noqa: E402,F401  (before transformers: keeps the checkout's kernels/ off sys.path too)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP  # noqa: E402

from tunelab.kernels.backend import interpreter_on  # noqa: E402
from tunelab.kernels.linear_ce import linear_cross_entropy  # noqa: E402
from tunelab.kernels.patch import patch_model  # noqa: E402

GPU = dict(hidden=4096, inter=14336, kv=1024, rank=16, tokens=8192, vocab=128256, dtype=torch.bfloat16)
CPU = dict(hidden=1024, inter=2816, kv=256, rank=16, tokens=2048, vocab=32000, dtype=torch.float32)
# --smoke: the script's own check, in seconds; with TRITON_INTERPRET=1 the Triton rows run too (interpreted).
SMOKE = dict(hidden=64, inter=176, kv=32, rank=8, tokens=96, vocab=300, dtype=torch.float32)


class Linear(nn.Module):
    def __init__(self, d_in, d_out, dtype):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


class LlamaAttention(nn.Module):  # only the q/k/v projections, which is what is fused
    def __init__(self, hidden, kv, dtype):
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(hidden, kv, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(hidden, kv, bias=False, dtype=dtype)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def lora_models(module: nn.Module, rank: int, backends: list[str]) -> tuple[nn.Module, list[nn.Module]]:
    """PEFT, and one fused twin per backend, with the same random weights; B non-zero so every gradient is real work."""
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(module, config, autocast_adapter_dtype=False)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    twins = []
    for backend in backends:
        fused = copy.deepcopy(peft)
        report = patch_model(fused, backend)
        assert report.patched and not report.refused, report.describe()
        twins.append(fused)
    return peft, twins


def lora_flops(tokens: int, shapes: list[tuple[int, int]], rank: int) -> float:
    """Useful work of forward+backward (dx, dA, dB; the frozen W gets no gradient): the same count for both."""
    return sum(2 * tokens * (2 * i * o + 3 * rank * (i + o)) for i, o in shapes)


def fwd_bwd(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    model(x).backward(dy)


def measure(steps, device: str, reps: int) -> list[tuple[float, float]]:
    """Per step: (median seconds, peak memory above the starting point in MiB; CPU: saved-activation MiB).

    The steps are timed in turn within each repetition, so a machine whose load changes (shared CPUs,
    GPU clocks) weighs on all of them alike.
    """
    for step in steps:
        step()  # warm-up (Triton compiles here)
    times = [[] for _ in steps]
    for _ in range(reps):
        for step, samples in zip(steps, times):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
    return [(statistics.median(samples), memory(step, device)) for step, samples in zip(steps, times)]


def memory(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    seen: dict[int, int] = {}

    def pack(tensor):
        if not isinstance(tensor, nn.Parameter):
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values()) / 2**20


def rel_err(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()


def check(peft: nn.Module, fused: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> str:
    """Fused and PEFT against fp32 truth on the first 1024 tokens: output, dx and every adapter gradient."""
    x, dy = x[:1024].detach(), dy[:1024]
    exact = copy.deepcopy(peft).float()
    results = {}
    for name, model in (("peft", peft), ("fused", fused), ("exact", exact)):
        model.zero_grad(set_to_none=True)
        inp = (x.float() if name == "exact" else x).clone().requires_grad_()
        out = model(inp)
        out.backward(dy.float() if name == "exact" else dy)
        grads = [out, inp.grad] + [p.grad for p in model.parameters() if p.requires_grad]
        results[name] = grads
        model.zero_grad(set_to_none=True)
    fused_err = max(rel_err(g, e) for g, e in zip(results["fused"], results["exact"]))
    peft_err = max(rel_err(g, e) for g, e in zip(results["peft"], results["exact"]))
    bound = 1e-5 if x.dtype == torch.float32 else max(2e-2, 2 * peft_err)
    verdict = "ok" if fused_err <= bound else "FAIL"
    return f"{verdict} (max rel err vs fp32: fused {fused_err:.1e}, PEFT {peft_err:.1e})"


def lora_cases(s: dict, device: str, backends: list[str], reps: int) -> list[tuple]:
    h, i, kv, r, n, dt = s["hidden"], s["inter"], s["kv"], s["rank"], s["tokens"], s["dtype"]
    cases = [
        (f"LoRA {h}->{h}", Linear(h, h, dt), h, [(h, h)]),
        (f"LoRA {h}->{i}", Linear(h, i, dt), h, [(h, i)]),
        (f"LoRA {i}->{h}", Linear(i, h, dt), i, [(i, h)]),
        (f"LoRA q/k/v {h}->{h}/{kv}/{kv}", LlamaAttention(h, kv, dt), h, [(h, h), (h, kv), (h, kv)]),
        (f"LoRA SwiGLU MLP {h}->{i}->{h}", LlamaMLP(LlamaConfig(hidden_size=h, intermediate_size=i)).to(dt), h,
         [(h, i), (h, i), (i, h)]),
    ]
    rows = []
    for name, module, d_in, shapes in cases:
        peft, twins = lora_models(module.to(device), r, backends)
        x = torch.randn(n, d_in, device=device, dtype=dt, requires_grad=True)
        dy = torch.randn(n, sum(o for _, o in shapes) if "q/k/v" in name else shapes[-1][1], device=device, dtype=dt)
        verdicts = [check(peft, fused, x, dy) for fused in twins]
        steps = [lambda model=model: fwd_bwd(model, x, dy) for model in (peft, *twins)]
        (peft_t, peft_m), *fused = measure(steps, device, reps)
        rows += [(name, backend, lora_flops(n, shapes, r), peft_t, peft_m, *timing, verdict)
                 for backend, timing, verdict in zip(backends, fused, verdicts)]
        del peft, twins, x, dy
    return rows


def ce_case(s: dict, device: str, backends: list[str], reps: int) -> list[tuple]:
    n, d, v, dt = s["tokens"], s["hidden"], s["vocab"], s["dtype"]
    torch.manual_seed(0)
    hidden = torch.randn(n, d, device=device, dtype=dt, requires_grad=True)
    weight = torch.randn(v, d, device=device, dtype=dt) * d**-0.5  # frozen head
    labels = torch.randint(0, v, (n,), device=device)

    def unfused():
        return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100)

    def fused(backend: str):
        return linear_cross_entropy(hidden, weight, labels, backend=backend)

    want = unfused()
    grad_want = torch.autograd.grad(want, hidden)[0]
    verdicts = []
    for backend in backends:
        got = fused(backend)
        err = max(abs(got.item() - want.item()) / abs(want.item()), rel_err(torch.autograd.grad(got, hidden)[0], grad_want))
        ok = err <= (1e-5 if dt == torch.float32 else 1e-2)
        verdicts.append(("ok" if ok else "FAIL") + f" (max rel err vs unfused {err:.1e})")
    steps = [lambda: unfused().backward()] + [lambda backend=backend: fused(backend).backward() for backend in backends]
    (unfused_t, unfused_m), *timings = measure(steps, device, reps)
    return [(f"linear CE {n}x{d} vocab {v}", backend, 4 * n * d * v, unfused_t, unfused_m, *timing, verdict)
            for backend, timing, verdict in zip(backends, timings, verdicts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the small CPU version (PyTorch path vs PEFT)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes: checks that the script runs")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case (median reported)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not (args.cpu or args.smoke)
    # On a GPU the PyTorch path (cuBLAS matmuls, the LoRA add in the GEMM's epilogue) is timed beside Triton.
    device, backends, shapes = ("cuda", ["triton", "torch"], GPU) if on_gpu else ("cpu", ["torch"], CPU)
    if args.smoke:
        shapes, backends = SMOKE, (["triton", "torch"] if interpreter_on() else ["torch"])
    reps = args.reps or (20 if on_gpu else 5)
    where = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"tunelab kernels benchmark: {where}; torch {torch.__version__}; "
          f"{shapes['tokens']} tokens, rank {shapes['rank']}, {str(shapes['dtype']).replace('torch.', '')}; "
          f"median of {reps}, PEFT and fused timed in turn")
    rows = lora_cases(shapes, device, backends, reps) + ce_case(shapes, device, backends, reps)
    memory = "peak MiB" if on_gpu else "saved MiB"
    print(f"\n| case | backend | PEFT / unfused ms | fused ms | speed-up | PEFT TFLOP/s | fused TFLOP/s | "
          f"PEFT {memory} | fused {memory} | memory ratio | check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for name, backend, flops, base_t, base_m, fused_t, fused_m, verdict in rows:
        failed |= verdict.startswith("FAIL")
        print(f"| {name} | {backend} | {base_t * 1e3:.1f} | {fused_t * 1e3:.1f} | {base_t / fused_t:.2f}x | "
              f"{flops / base_t / 1e12:.2f} | {flops / fused_t / 1e12:.2f} | {base_m:.0f} | {fused_m:.0f} | "
              f"{base_m / max(fused_m, 1e-9):.2f}x | {verdict} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
