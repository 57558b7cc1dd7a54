"""``tunelab plan``: the estimate as a table, whether it fits a GPU, and which knob to turn first.

A GPU is usable up to ``USABLE_SHARE`` of its memory minus ``CUDA_RESERVE``: the CUDA context and
cuBLAS/NCCL workspaces take about 0.5–1 GiB before any tensor exists, and PyTorch's caching
allocator loses some memory to fragmentation in long runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from tunelab.config.schema import Config
from tunelab.errors import UserError, did_you_mean
from tunelab.plan.architectures import Architecture, lookup
from tunelab.plan.memory import Plan, estimate, gib

# Total memory as nvidia-smi reports it, in MiB.
GPUS = {
    "T4": 15360, "V100-16GB": 16384, "V100-32GB": 32768, "A10G": 23028, "L4": 23034, "RTX3090": 24576,
    "RTX4090": 24564, "A6000": 49140, "L40S": 46068, "A100-40GB": 40960, "A100-80GB": 81920,
    "H100-80GB": 81559, "H200": 143771,
}
USABLE_SHARE = 0.90
CUDA_RESERVE = 1 * 2**30


@dataclass
class Knob:
    change: str
    total: float
    fits: bool


def gpu_bytes(name: str) -> int:
    """Memory of ``--gpu``: a name from ``GPUS`` or a size such as 24GB (read as GiB, as GPU makers mean it)."""
    size = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*GB\s*", name, re.IGNORECASE)
    if size:
        return int(float(size.group(1)) * 2**30)
    for known, mib in GPUS.items():
        if known.lower() == name.lower():
            return mib * 2**20
    raise UserError(f'--gpu "{name}" is not a GPU tunelab knows{did_you_mean(name, GPUS)}; give a size such as 24GB '
                    f"or one of: {', '.join(GPUS)}.")


def usable(total: int) -> float:
    return total * USABLE_SHARE - CUDA_RESERVE


def knobs(config: Config, arch: Architecture, devices: int, limit: float) -> list[Knob]:
    """Changes that lower memory, cheapest to the training first, applied one after another until it fits."""
    steps = []
    t = config.training
    if not t.gradient_checkpointing and config.recipe.name not in ("prefix", "ptuning"):
        steps.append(("training.gradient_checkpointing=true", {"training": {"gradient_checkpointing": True}}))
    if t.kernels == "off":
        steps.append(("training.kernels=auto (fused linear cross-entropy)", {"training": {"kernels": "auto"}}))
    if t.micro_batch_size > 1:
        ga = t.gradient_accumulation_steps * t.micro_batch_size
        steps.append((f"training.micro_batch_size=1 training.gradient_accumulation_steps={ga}",
                      {"training": {"micro_batch_size": 1, "gradient_accumulation_steps": ga}}))
    if (config.recipe.name == "full" and t.optimizer not in ("adamw_bnb_8bit", "paged_adamw_8bit", "sgd")
            and config.distributed.strategy != "deepspeed"):  # DeepSpeed brings its own optimizer
        steps.append(("training.optimizer=adamw_bnb_8bit", {"training": {"optimizer": "adamw_bnb_8bit"}}))
    if config.recipe.name in ("lora", "rslora"):
        steps.append(("recipe.name=qlora (4-bit base)", {"recipe": "qlora"}))
    if devices > 1 and config.distributed.strategy == "ddp":
        steps.append(("distributed.strategy=fsdp", {"distributed": {"strategy": "fsdp"}}))
    if config.distributed.strategy == "fsdp" and not config.distributed.fsdp.cpu_offload:
        steps.append(("distributed.fsdp.cpu_offload=true", {"distributed": {"fsdp": {"cpu_offload": True}}}))
    if config.distributed.strategy != "fsdp" and config.recipe.name != "qlora":
        steps.append(("distributed.strategy=deepspeed with ZeRO-3, optimizer and parameters offloaded to CPU",
                      {"distributed": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3, "offload_optimizer": True,
                                                                              "offload_params": True}}}))
    found, current = [], config
    for change, update in steps:
        current = _apply(current, update)
        total = estimate(current, arch, devices).total
        found.append(Knob(change, total, total <= limit))
        if total <= limit:
            break
    return found


def _apply(config: Config, update: dict) -> Config:
    """A copy of ``config`` with ``update`` merged in (recipe: a name switches to that recipe, options kept)."""
    if isinstance(update.get("recipe"), str):
        from tunelab.recipes import get_recipe_class

        options = {**config.recipe.model_dump(), "name": update["recipe"]}
        return config.model_copy(update={"recipe": get_recipe_class(update["recipe"]).Options(**options)})
    return Config.model_validate({**_merge(config.model_dump(), update), "recipe": config.recipe})


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def plan_config(config: Config, devices: int = 1, gpu: str | None = None) -> dict:
    """Everything ``tunelab plan`` prints, as one JSON-ready dict."""
    arch = lookup(config.model.name_or_path)
    plan = estimate(config, arch, devices)
    result = {"plan": plan, "gpu": gpu, "gpu_bytes": None, "usable_bytes": None, "fits": None, "knobs": []}
    if gpu:
        total = gpu_bytes(gpu)
        limit = usable(total)
        result.update(gpu_bytes=total, usable_bytes=limit, fits=plan.total <= limit)
        if plan.total > limit:
            result["knobs"] = knobs(config, arch, devices, limit)
    return result


def to_json(result: dict) -> str:
    plan: Plan = result["plan"]
    out = {**{k: v for k, v in result.items() if k not in ("plan", "knobs")},
           "model": plan.model, "recipe": plan.recipe, "devices": plan.devices, "strategy": plan.strategy,
           "tokens_per_micro_batch": plan.tokens, "parameters": plan.total_params, "trainable_parameters": plan.trainable_params,
           "rows": [asdict(row) for row in plan.rows], "total_bytes": plan.total, "host_bytes": plan.host_bytes,
           "assumptions": plan.assumptions, "knobs": [asdict(k) for k in result["knobs"]]}
    return json.dumps(out, indent=2)


def format_report(result: dict) -> str:
    plan: Plan = result["plan"]
    lines = [f"tunelab plan: {plan.model}, recipe {plan.recipe}, {plan.strategy}"
             + (f" × {plan.devices} devices" if plan.devices > 1 else "")
             + f"; {plan.trainable_params:,} of {plan.total_params:,} parameters trained; per device:", ""]
    width = max(len(r.component) for r in plan.rows)
    for row in plan.rows:
        lines.append(f"  {row.component:<{width}}  {gib(row.bytes):8.2f} GiB  {row.note}")
    lines.append(f"  {'total':<{width}}  {gib(plan.total):8.2f} GiB")
    if plan.host_bytes:
        lines.append(f"  (and {gib(plan.host_bytes):.2f} GiB of CPU RAM per process for what is offloaded)")
    lines.append("")
    lines += [f"  assumes {note}" for note in plan.assumptions]
    if result["gpu"]:
        limit = result["usable_bytes"]
        lines.append("")
        verdict = "fits" if result["fits"] else "does not fit"
        lines.append(f"tunelab plan: {verdict} a {result['gpu']} ({gib(result['gpu_bytes']):.1f} GiB; usable "
                     f"{gib(limit):.1f} GiB = {USABLE_SHARE:.0%} minus {gib(CUDA_RESERVE):.0f} GiB for the CUDA context "
                     f"and fragmentation): {gib(plan.total):.2f} GiB estimated.")
        for index, knob in enumerate(result["knobs"]):
            first = "turn first" if index == 0 else "then"
            lines.append(f"  {first}: {knob.change} -> {gib(knob.total):.2f} GiB"
                         + (" (fits)" if knob.fits else ""))
        if result["knobs"] and not result["knobs"][-1].fits:
            lines.append("  still too large: use more or larger GPUs, or lower data.max_length.")
    return "\n".join(lines) + "\n"
