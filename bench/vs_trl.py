"""tunelab vs TRL SFTTrainer + PEFT: the same model, data, hyperparameters and optimizer steps, side by side.

    python bench/vs_trl.py                      # LoRA, 30 steps, 3 repetitions (the measurement)
    python bench/vs_trl.py --variant qlora      # or full
    python bench/vs_trl.py --levers             # tunelab with each of its choices flipped in turn
    python bench/vs_trl.py --quick              # a small model, 3 steps, 1 repetition (smoke test)
    python bench/vs_trl.py --set model.dtype=float32 --workload max_length=1024   # one setting / workload field

Systems, each run in a fresh subprocess (so peak RSS is that system's own), in the order
trl, trl_packed, tunelab, repeated --reps times (A B C A B C ...); the median of the repetitions is reported:

- trl:        SFTTrainer(model=<folder>, args=SFTConfig(...), peft_config=LoraConfig(...)) with TRL's defaults
              (bf16 autocast, gradient checkpointing, adamw_torch_fused, linear schedule, logging every 10 steps);
              only what the workload fixes is set: steps, micro-batch, learning rate, seed, max_length, report_to,
              and use_cpu=True (without it TRL's bf16 default refuses to start on a machine without a GPU).
- trl_packed: the same with packing=True (TRL's default strategy "bfd", which turns on padding-free batches).
- tunelab:    tunelab.train.run.train with its settings for this CPU (``tunelab_settings`` below; bf16 weights
              where the CPU multiplies bf16 natively, fp32 where it would emulate it).
- trl_tuned:  optional (--systems trl,trl_packed,tunelab,trl_tuned): packing=True, gradient_checkpointing=False,
              and bf16 autocast only where the CPU has bf16 matrix instructions: TRL as a user who tuned it would run it.

Run time on the project's 2-core CPU with avx512_bf16 (LoRA, 30 steps): about 70 s per run for trl, 220 s for
trl_packed and 40 s for tunelab, so the default 3 repetitions take about 17 minutes. On a CPU without bf16
matrix instructions TRL's bf16 default is about 10x slower (see bench/RESULTS.md).

The data is a prompt/completion set in conversational form (ChatML via the tokenizer's template); both
systems tokenize it themselves, and each child reports a hash of the tokenized examples it trained on, so the
output shows whether the systems saw exactly the same tokens and labels.

Tokens/s counts only tokens that carry loss, measured the same way for every system: the benchmark wraps
the Trainer's training_step and counts labels != -100 (shifted: labels[..., 1:]) in every batch the
optimizer steps actually consumed, and times from train begin to the end of the last optimizer step.
Output: JSON lines on stdout (env, one per system, ratios); progress and markdown tables on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

# Python puts this folder first on sys.path, where bench/kernels.py would shadow the PyPI `kernels` package
# that transformers imports. Take it off, and append it back (after site-packages) for _workload.
HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
sys.path.append(str(HERE))

import _workload as wl  # noqa: E402

SYSTEMS = ("trl", "trl_packed", "tunelab")
# Not run by default (--systems adds it): TRL packed without gradient checkpointing, with bf16 autocast only where the
# CPU has bf16 matrix instructions, i.e. TRL as a user who tuned it for this CPU would run it. It shows how much of the gap is TRL's defaults and how much its code.
OPTIONAL_SYSTEMS = ("trl_tuned",)
RESULT_TAG = "VS_TRL_RESULT "
LAST_STEPS = 5  # final loss = mean of the last few optimizer steps' losses

# tunelab's choices for this CPU, each measured in bench/RESULTS.md (`--levers` flips them one at a time).
# Keys with a section name are tunelab config keys; `bench.*` keys switch a lever that has no config key.
def tunelab_settings(overrides: dict | None = None) -> dict:
    from tunelab.models.load import cpu_has_bf16_matmul

    return {
        "data.packing": True,  # whole examples per row, per-example position ids: no padding, no cross-attention
        "training.kernels": "auto",  # CPU: the PyTorch recompute-instead-of-store LoRA path + chunked linear CE
        "training.gradient_checkpointing": False,  # the fused kernels already save little; recomputing costs time
        # bf16 where the CPU multiplies bf16 natively (avx512_bf16/AMX), else fp32 (emulated bf16 is far slower)
        "model.dtype": "bfloat16" if cpu_has_bf16_matmul() else "float32",
        "training.optimizer": "adamw_torch_fused",  # the same optimizer TRL's defaults pick
        "bench.fused_loss": True,  # off: fused LoRA layers but transformers' own loss over full logits
        "bench.loss_chunk_rows": None,  # None: tunelab's choice (kernels.linear_ce.chunk_rows)
        "bench.torch_compile": False,  # the Trainer's torch_compile (inductor) around the patched model
        **(overrides or {}),
    }


# --levers: tunelab with one choice flipped at a time, against its settings above (label, overrides).
LEVERS = (
    ("tunelab (all levers)", {}),
    ("no packing (padded batches)", {"data.packing": False}),
    ("fp32 instead of bf16", {"model.dtype": "float32"}),
    ("kernels off (PEFT LoRA layers, full logits)", {"training.kernels": "off"}),
    ("fused LoRA layers, unfused loss", {"bench.fused_loss": False}),
    ("loss chunks of 1024 rows (the GPU size)", {"bench.loss_chunk_rows": 1024}),
    ("gradient checkpointing on", {"training.gradient_checkpointing": True}),
    ("torch.compile on", {"bench.torch_compile": True}),
)
OVERRIDES_ENV = "VS_TRL_TUNELAB_SET"  # parent -> child: the tunelab overrides of one run, as JSON


# ====================================================================== child side
BENCH: dict = {"loss_tokens": [], "real_tokens": [], "losses": [], "step_ends": [], "t0": None, "trainer": None}


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _measured(trainer_cls):
    """The same instrumentation for every system: count what each optimizer step consumed, time the steps."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            BENCH["rss_at_train_begin_mb"] = _rss_mb()
            BENCH["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            BENCH["step_ends"].append(time.perf_counter())

    class Measured(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(Clock())
            BENCH["trainer"] = self

        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs["labels"]
            BENCH["loss_tokens"].append(int((labels[..., 1:] != -100).sum()))
            if "attention_mask" in inputs:  # padded batches
                real = int(inputs["attention_mask"].sum())
            elif "packed_real_tokens" in inputs:  # tunelab's packed rows
                real = int(inputs["packed_real_tokens"].sum())
            else:  # TRL padding-free: one flattened row without padding
                real = int(inputs["input_ids"].numel())
            BENCH["real_tokens"].append(real)
            loss = super().training_step(model, inputs, num_items_in_batch)
            BENCH["losses"].append(float(loss))
            return loss

    return Measured


def _trained_pairs(dataset):
    """(input_ids, labels) of every example in the prepared training set of either system."""
    if isinstance(dataset, list):  # tunelab: Encoded, or packed rows of Encoded
        for item in dataset:
            for example in item if isinstance(item, list) else [item]:
                yield example.input_ids, example.labels
        return
    for row in dataset:  # TRL: a datasets.Dataset; packed rows carry seq_lengths
        lengths = row.get("seq_lengths") or [len(row["input_ids"])]
        start = 0
        for n in lengths:
            yield row["input_ids"][start : start + n], row["labels"][start : start + n]
            start += n


def _cpu_bf16() -> bool:
    from tunelab.models.load import cpu_has_bf16_matmul

    return cpu_has_bf16_matmul()


def run_trl(w: wl.Workload, variant: str, packed: bool, workdir: Path, out_dir: Path, tuned: bool = False) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset("json", data_files=str(workdir / "data_trl.jsonl"), split="train")
    args = SFTConfig(
        output_dir=str(out_dir), max_steps=w.steps, per_device_train_batch_size=w.micro_batch,
        learning_rate=w.lr, seed=w.seed, max_length=w.max_length, packing=packed, report_to="none",
        # Without a GPU, TRL's default bf16=True stops with "Your setup doesn't support bf16/gpu. You need to
        # assign use_cpu if you want to train the model on CPU"; use_cpu=True is that message's fix, and it
        # keeps TRL's bf16 (CPU autocast) default.
        use_cpu=True,
        **({"bf16": _cpu_bf16(), "gradient_checkpointing": False} if tuned else {}),
    )
    peft_config = None if variant == "full" else LoraConfig(
        r=w.rank, lora_alpha=w.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16) if variant == "qlora" else None
    trainer = _measured(SFTTrainer)(model=str(workdir / "model"), args=args, train_dataset=dataset,
                                    peft_config=peft_config, quantization_config=quantization)
    trainer.train()
    settings = {
        "bf16": args.bf16, "autocast": trainer.accelerator.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
        "packing": args.packing, "packing_strategy": args.packing_strategy if packed else None,
        "padding_free": trainer.padding_free, "completion_only_loss": trainer.completion_only_loss,
        "optim": str(args.optim.value if hasattr(args.optim, "value") else args.optim),
        "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "logging_steps": args.logging_steps, "lora_dropout": 0.0 if peft_config else None,
        "model_dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
        "bnb_4bit_compute_dtype": "bfloat16" if quantization else None,
    }
    return {"settings": settings, "data_digest": wl.digest(_trained_pairs(trainer.train_dataset))}


def _apply_bench_levers(settings: dict, tunelab_run) -> None:
    """The ``bench.*`` levers: switched by patching this child process, since tunelab has no key for them."""
    import tunelab.kernels.linear_ce as fused

    if settings["bench.loss_chunk_rows"]:
        rows = int(settings["bench.loss_chunk_rows"])
        fused.chunk_rows = lambda vocab, device_type="cuda": rows
    if not settings["bench.fused_loss"]:
        patch_model = tunelab_run.patch_model

        def without_loss(*args, **kwargs):
            report = patch_model(*args, **kwargs)
            report.loss_refusal = "switched off by bench/vs_trl.py"
            return report
        tunelab_run.patch_model = without_loss
    if settings["bench.torch_compile"]:
        arguments = tunelab_run._training_arguments
        tunelab_run._training_arguments = lambda *a, **k: replace(arguments(*a, **k), torch_compile=True)


def run_tunelab(w: wl.Workload, variant: str, workdir: Path, out_dir: Path) -> dict:
    import tunelab.train.run as tunelab_run
    from tunelab.config.load import parse_config

    settings = tunelab_settings(json.loads(os.environ.get(OVERRIDES_ENV, "{}")))
    _apply_bench_levers(settings, tunelab_run)
    recipe = {"name": "full"} if variant == "full" else {
        "name": variant, "r": w.rank, "alpha": w.alpha, "dropout": 0.0, "target_modules": "all-linear"}
    if variant == "qlora":  # the 4-bit weights are dequantized to the model's dtype
        recipe |= {"quant_type": "nf4", "double_quant": True, "compute_dtype": settings["model.dtype"]}
    raw = {
        "model": {"name_or_path": str(workdir / "model"), "dtype": settings["model.dtype"]},
        "recipe": recipe,
        "data": {"datasets": [{"path": str(workdir / "data.jsonl"), "format": "prompt_completion"}],
                 "max_length": w.max_length, "packing": settings["data.packing"]},
        "training": {"seed": w.seed, "max_steps": w.steps, "micro_batch_size": w.micro_batch,
                     "gradient_accumulation_steps": 1, "learning_rate": w.lr,
                     "lr_scheduler": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                     "optimizer": settings["training.optimizer"], "logging_steps": 10,
                     "gradient_checkpointing": settings["training.gradient_checkpointing"],
                     "kernels": settings["training.kernels"]},
        "eval": {"before_training": False, "exact_match": False},
        "output_dir": str(out_dir),
    }
    config = parse_config(raw, source="bench/vs_trl.py")
    tunelab_run.RecipeTrainer = _measured(tunelab_run.RecipeTrainer)  # this child process only
    tunelab_run.train(config, output_dir=out_dir, overwrite=True)
    settings |= {"lr_scheduler": "linear", "logging_steps": 10, "lora_dropout": 0.0}
    if variant == "qlora":
        settings["bnb_4bit_compute_dtype"] = settings["model.dtype"]
    return {"settings": settings, "data_digest": wl.digest(_trained_pairs(BENCH["trainer"].train_dataset))}


def child(system: str, variant: str, workdir: Path) -> int:
    started = time.perf_counter()
    w = wl.workload_from_json((workdir / "workload.json").read_text())
    out_dir = Path(tempfile.mkdtemp(prefix=f"{system}-", dir=workdir))
    try:
        if system == "tunelab":
            extra = run_tunelab(w, variant, workdir, out_dir)
        else:
            extra = run_trl(w, variant, system in ("trl_packed", "trl_tuned"), workdir, out_dir, tuned=system == "trl_tuned")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    import torch

    ends, t0 = BENCH["step_ends"], BENCH["t0"]
    train_s = ends[-1] - t0
    loss_tokens, losses = BENCH["loss_tokens"], BENCH["losses"]
    result = {
        "system": system, "variant": variant, "steps": len(ends),
        "loss_tokens": sum(loss_tokens), "real_tokens": sum(BENCH["real_tokens"]),
        "train_s": round(train_s, 3),
        "tokens_per_s": sum(loss_tokens) / train_s,
        "tokens_per_s_after_first_step": sum(loss_tokens[1:]) / (ends[-1] - ends[0]) if len(ends) > 1 else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_at_train_begin_mb": round(BENCH.get("rss_at_train_begin_mb", float("nan")), 1),
        "final_loss": statistics.fmean(losses[-LAST_STEPS:]),
        "losses": [round(x, 5) for x in losses],
        "step_s": [round(b - a, 3) for a, b in zip([t0] + ends[:-1], ends)],
        "loss_tokens_per_step": loss_tokens,
        "trainable_parameters": sum(p.numel() for p in BENCH["trainer"].model.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
        "child_s": round(time.perf_counter() - started, 2),
        **extra,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ====================================================================== parent side
def log(message: str) -> None:
    print(f"vs_trl: {message}", file=sys.stderr, flush=True)


def environment() -> dict:
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "tunelab"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu, "cores": os.cpu_count(),
        "bf16_matrix_flags": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
        "versions": versions, "git_commit": commit,
    }


def matmul_peak(size: int, seconds: float = 2.0) -> dict:
    """Best-of GFLOP/s of a square fp32 matmul (the MFU denominator), and the same for bf16 for reference.

    Timed as F.linear (x·Wᵀ), the call every model linear layer makes: on CPUs without bf16 matrix
    instructions a bare bf16 ``a @ b`` takes a far slower path than bf16 F.linear (measured here: 0.26 vs
    6.3 GFLOP/s), and F.linear is what autocast training runs.
    """
    import torch
    import torch.nn.functional as F

    peaks = {}
    for name, dtype, budget in (("fp32", torch.float32, seconds), ("bf16", torch.bfloat16, seconds / 2)):
        n = size if dtype == torch.float32 else size // 2
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        F.linear(a, b)
        best, spent = float("inf"), 0.0
        while spent < budget:
            start = time.perf_counter()
            F.linear(a, b)
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
        peaks[f"{name}_gflops"] = round(2 * n**3 / best / 1e9, 2)
        peaks[f"{name}_size"] = n
    return peaks


def prepare(w: wl.Workload, workdir: Path) -> dict:
    """Build the model and the data once; return what the output reports about them."""
    import tunelab  # noqa: F401  (before transformers)
    from transformers import AutoTokenizer

    from tunelab.data.encode import IGNORE_INDEX, encode_example
    from tunelab.data.formats import to_example

    model_info = wl.build_model(w, workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")

    def encode(row):
        return encode_example(to_example(row, "prompt_completion", "bench", {}, None), tokenizer, train_on_inputs=False)

    rows = wl.make_rows(w, lambda prompt, completion: len(encode({"prompt": prompt, "completion": completion}).input_ids))
    encoded = [encode(row) for row in rows]
    with open(workdir / "data.jsonl", "w") as f:  # tunelab's prompt_completion format
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(workdir / "data_trl.jsonl", "w") as f:  # TRL's conversational prompt-completion format
        f.writelines(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                 "completion": [{"role": "assistant", "content": r["completion"]}]}) + "\n" for r in rows)
    (workdir / "workload.json").write_text(wl.workload_to_json(w))
    lengths = sorted(len(e.input_ids) for e in encoded)
    pct = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return {
        "model": {"architecture": "Llama", "hidden": w.hidden, "layers": w.layers, "heads": w.heads, "kv_heads": w.kv_heads,
                  "intermediate": w.intermediate, "vocab": w.vocab, "parameters": model_info["parameters"],
                  "matmul_parameters": wl.matmul_params(w),
                  "tokenizer": f"tunelab byte-level BPE, {model_info['tokenizer_tokens']} tokens; model vocab {w.vocab} "
                               "(ids above the tokenizer's never occur; the LM head still computes all 32000 logits)"},
        "data": {"examples": len(rows), "format": "prompt/completion, ChatML, loss on the completion and its end-of-turn",
                 "tokens_median": pct(0.5), "tokens_p90": pct(0.9), "tokens_p99": pct(0.99), "tokens_max": lengths[-1],
                 "tokens_mean": round(statistics.fmean(lengths), 1), "max_length": w.max_length,
                 "loss_token_share": round(sum(sum(l != IGNORE_INDEX for l in e.labels) for e in encoded) / sum(lengths), 3),
                 "digest": wl.digest((e.input_ids, e.labels) for e in encoded)},
    }


def run_child(system: str, variant: str, workdir: Path, timeout: float, overrides: dict | None = None) -> dict:
    env = dict(os.environ, **{OVERRIDES_ENV: json.dumps(overrides or {})}, TUNELAB_CACHE=str(workdir / "cache"), HF_DATASETS_CACHE=str(workdir / "hf-datasets"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_DISABLED="true", PYTHONWARNINGS="ignore")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--variant", variant, "--workdir", str(workdir)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"system": system, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["wall_s"] = round(wall, 2)
    kernels = [line for line in proc.stdout.splitlines() if line.startswith("tunelab: kernels")]
    if kernels:
        result["settings"]["kernels_report"] = kernels[0].removeprefix("tunelab: ")
    return result


def summarize(system: str, runs: list[dict], w: wl.Workload, variant: str, peak: dict) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"kind": "system", "system": system, "ok": False, "errors": [r["error"] for r in runs]}
    med = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
    first = ok[0]
    flops = wl.model_flops(w, variant, first["real_tokens"], first["loss_tokens"])
    train_s = med("train_s")
    return {
        "kind": "system", "system": system, "variant": variant, "ok": True, "reps": len(ok),
        "tokens_per_s": round(med("tokens_per_s"), 1),
        "tokens_per_s_after_first_step": round(med("tokens_per_s_after_first_step"), 1) if first["steps"] > 1 else None,
        "peak_rss_mb": round(med("peak_rss_mb"), 1), "rss_at_train_begin_mb": round(med("rss_at_train_begin_mb"), 1),
        "final_loss": round(med("final_loss"), 4), "final_loss_is": f"mean of the last {min(LAST_STEPS, first['steps'])} steps",
        "first_loss": round(statistics.median(r["losses"][0] for r in ok), 4),
        "train_s": round(train_s, 2), "wall_s": round(med("wall_s"), 2), "steps": first["steps"],
        "loss_tokens": first["loss_tokens"], "real_tokens": first["real_tokens"],
        "mfu_fp32": round(flops / train_s / (peak["fp32_gflops"] * 1e9), 4),
        "mfu_bf16": round(flops / train_s / (peak["bf16_gflops"] * 1e9), 4),  # against the peak bf16 autocast could reach
        "model_gflops": round(flops / 1e9, 2), "achieved_gflops": round(flops / train_s / 1e9, 2),
        "trainable_parameters": first["trainable_parameters"], "torch_threads": first["torch_threads"],
        "data_digest": first["data_digest"], "settings": first["settings"],
        "per_rep": [{k: r[k] for k in ("tokens_per_s", "peak_rss_mb", "final_loss", "train_s", "wall_s")} for r in ok],
        "losses_rep1": first["losses"],
        "errors": [r["error"] for r in runs if "error" in r] or None,
    }


def ratios(by_system: dict[str, dict]) -> dict:
    out: dict = {"kind": "ratios"}
    ours = by_system.get("tunelab")
    for base in ("trl", "trl_packed", "trl_tuned"):
        ref = by_system.get(base)
        if not (ours and ours.get("ok") and ref and ref.get("ok")):
            if base != "trl_tuned" or ref:
                out[f"vs_{base}"] = None
            continue
        out[f"vs_{base}"] = {
            "tokens_per_s": round(ours["tokens_per_s"] / ref["tokens_per_s"], 3),
            "peak_rss": round(ours["peak_rss_mb"] / ref["peak_rss_mb"], 3),
            "final_loss_rel_diff": round(ours["final_loss"] / ref["final_loss"] - 1, 4),
            "loss_tokens_seen": round(ours["loss_tokens"] / ref["loss_tokens"], 3),
            "same_examples": ours["data_digest"] == ref["data_digest"],
        }
    out["targets"] = {"tokens_per_s_vs_trl": ">= 4", "tokens_per_s_vs_trl_packed": ">= 3", "peak_rss_vs_trl": "<= 0.6",
                      "final_loss": "within 2% for the same tokens (compare with trl_packed: same step count, "
                                    "about the same loss tokens per step)"}
    return out


def markdown(summaries: dict[str, dict], w: wl.Workload, variant: str) -> str:
    """The table for bench/RESULTS.md (stderr; stdout stays JSON lines)."""
    rows = ["| system | loss tokens/s | peak RSS MB | final loss | loss tokens | train s | wall s | MFU (fp32 peak) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        if not s.get("ok"):
            rows.append(f"| {name} | failed | | | | | | |")
            continue
        rows.append(f"| {name} | {s['tokens_per_s']:.1f} | {s['peak_rss_mb']:.0f} | {s['final_loss']:.4f} | {s['loss_tokens']} | "
                    f"{s['train_s']:.1f} | {s['wall_s']:.1f} | {s['mfu_fp32']:.1%} |")
    reps = max(s.get("reps", 0) for s in summaries.values())
    return "\n".join([f"vs_trl: {variant}, {w.steps} steps, micro-batch {w.micro_batch}, median of {reps}", *rows])


def lever_table(summaries: dict[str, dict]) -> str:
    """--levers: each flipped choice against tunelab with all of them (stderr, for bench/RESULTS.md)."""
    base = summaries[LEVERS[0][0]]
    rows = ["| tunelab with | loss tokens/s | × all levers | after step 1 | × all levers | peak RSS MB | × all levers | final loss |",
            "|---|---|---|---|---|---|---|---|"]
    for label, s in summaries.items():
        if not s.get("ok"):
            rows.append(f"| {label} | failed: {s['errors'][0][:120]} | | | | | | |")
            continue
        later, base_later = s["tokens_per_s_after_first_step"] or 0, base["tokens_per_s_after_first_step"] or 1
        rows.append(f"| {label} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / base['tokens_per_s']:.2f}× | "
                    f"{later:.1f} | {later / base_later:.2f}× | "
                    f"{s['peak_rss_mb']:.0f} | {s['peak_rss_mb'] / base['peak_rss_mb']:.2f}× | {s['final_loss']:.4f} |")
    return "\n".join(rows)


def _assignments(pairs: list[str], what: str) -> dict:
    """``KEY=VALUE`` options; a value is read as JSON where it parses (1024, false, null), else as a string."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"{what} {pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("lora", "qlora", "full"), default="lora")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; 3 with --quick)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per system (default 3; 1 with --quick)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {','.join(SYSTEMS + OPTIONAL_SYSTEMS)}")
    parser.add_argument("--levers", action="store_true",
                        help="instead of the systems: tunelab with each of its choices flipped in turn (bench/RESULTS.md)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one of tunelab's settings, e.g. --set model.dtype=float32 (repeatable)")
    parser.add_argument("--workload", action="append", default=[], metavar="KEY=VALUE",
                        help="override a workload field, e.g. --workload max_length=2048 (repeatable; see _workload.py)")
    parser.add_argument("--quick", action="store_true", help="small model (hidden 64), 3 steps, 1 repetition: a smoke test")
    parser.add_argument("--examples", type=int, default=None, help="dataset size (default: enough for the steps)")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds allowed per child run")
    parser.add_argument("--keep", metavar="DIR", help="build the model and data in DIR and keep them")
    parser.add_argument("--child", choices=SYSTEMS + OPTIONAL_SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.variant, Path(args.workdir))

    try:
        overrides, workload_fields = _assignments(args.set, "--set"), _assignments(args.workload, "--workload")
    except ValueError as exc:
        parser.error(str(exc))
    unknown = sorted(set(overrides) - set(tunelab_settings()))
    if unknown:
        parser.error(f"unknown tunelab setting(s) {', '.join(unknown)}; choose from {', '.join(tunelab_settings())}")
    if args.levers:  # (label, system, tunelab overrides) per run
        runs_spec = [(label, "tunelab", overrides | flipped) for label, flipped in LEVERS]
    else:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in systems if s not in SYSTEMS + OPTIONAL_SYSTEMS]
        if unknown:
            parser.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS + OPTIONAL_SYSTEMS)}")
        runs_spec = [(s, s, overrides if s == "tunelab" else {}) for s in systems]
    w = wl.Workload(**(wl.QUICK if args.quick else {}))
    try:
        w = replace(w, steps=args.steps or w.steps, examples=args.examples if args.examples is not None else w.examples,
                    **workload_fields)
    except TypeError as exc:
        parser.error(f"--workload: {exc}")
    reps = args.reps or (1 if args.quick else 3)

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vs_trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        env = environment()
        log(f"building the model and {w.n_examples()} examples in {workdir}")
        info = prepare(w, workdir)
        log("measuring the matmul peak")
        peak = matmul_peak(512 if args.quick else 2048, seconds=0.5 if args.quick else 3.0)
        print(json.dumps({"kind": "env", **env, "variant": args.variant, "steps": w.steps, "reps": reps,
                          "order": "alternating: " + " | ".join(label for label, _, _ in runs_spec) + " per repetition",
                          "micro_batch": w.micro_batch, "workload": json.loads(wl.workload_to_json(w)),
                          "tunelab_settings": tunelab_settings(overrides),
                          "lora": {"r": w.rank, "alpha": w.alpha, "dropout": 0.0, "target_modules": "all-linear"},
                          "learning_rate": w.lr, "seed": w.seed, "matmul_peak": peak, "flops_formula": wl.FLOPS_FORMULA,
                          "tokens_per_s_is": "tokens that carry loss (labels[..., 1:] != -100 in the consumed batches) "
                                             "per second from train begin to the end of the last optimizer step",
                          **info}), flush=True)
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in runs_spec}
        for rep in range(reps):
            for label, system, run_overrides in runs_spec:
                log(f"rep {rep + 1}/{reps}: {label} ({args.variant}, {w.steps} steps)")
                result = run_child(system, args.variant, workdir, args.timeout, run_overrides)
                runs[label].append(result)
                log(f"  {label}: " + (result["error"] if "error" in result else
                                      f"{result['tokens_per_s']:.1f} loss tokens/s, peak RSS {result['peak_rss_mb']:.0f} MB, "
                                      f"final loss {result['final_loss']:.4f}, {result['wall_s']:.1f} s"))
        # Measured again after the runs; MFU uses the better of the two (a shared machine only ever lowers it).
        after = matmul_peak(512 if args.quick else 2048, seconds=0.5 if args.quick else 3.0)
        peak = {k: max(peak[k], after[k]) for k in peak} | {"before_runs": peak, "after_runs": after}
        summaries = {label: summarize(label, runs[label], w, args.variant, peak) for label in runs}
        for label in runs:
            summaries[label]["same_examples_as_prepared"] = summaries[label].get("data_digest") == info["data"]["digest"]
            print(json.dumps(summaries[label]), flush=True)
        if args.levers:
            print(lever_table(summaries), file=sys.stderr)
        else:
            print(json.dumps(ratios(summaries) | {"matmul_peak_used": peak}), flush=True)
        print(markdown(summaries, w, args.variant), file=sys.stderr)
        return 0 if all(s.get("ok") for s in summaries.values()) else 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
