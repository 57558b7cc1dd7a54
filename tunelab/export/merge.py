"""``tunelab merge``: fold a run's adapter into its base and write a plain Hugging Face model folder.

The base is streamed one tensor at a time from its safetensors files and the
output is written in shards, so memory holds one output shard and the (small)
adapter, never the whole model: a model larger than RAM can be merged. The
merged weights are computed from the adapter tensors with the same formulas PEFT
uses (tests compare the merged model's logits with the adapter model's):

    LoRA, QLoRA   W + (α/r)·B A            rsLoRA: α/√r
    DoRA          m / ‖W + (α/r)·B A‖_row · (W + (α/r)·B A)
    AdaLoRA       W + α/init_r · B (A ⊙ E)  (PEFT divides by the initial rank, not the pruned one)

QLoRA's adapter was trained against the NF4-dequantized base, so by default its
merge goes into that (``qlora_base="dequantized"``: every linear weight the 4-bit
load quantized is quantized and dequantized exactly as it was, then the update is
added); that reproduces the trained model. ``qlora_base="original"`` adds the update
to the full-precision weights instead, which shifts every weight by its quantization
error, something the adapter never saw. Both are written in the base's dtype, never 4-bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
)

from tunelab.errors import UserError
from tunelab.io import atomic_dir
from tunelab.models.load import resolve_model_path
from tunelab.models.trained import read_run

PEFT_PREFIX = "base_model.model."
Transform = Callable[[torch.Tensor], torch.Tensor]


class ShardWriter:
    """Write tensors into safetensors shards of at most ``max_bytes``; an index when there are several."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[list[str]] = []
        self.peak_bytes = 0  # largest amount of tensor data the output buffer held

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.buffer_bytes)

    def _flush(self) -> None:
        save_file(self.buffer, self.directory / f"shard-{len(self.shards)}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> int:
        """Name the shards the way ``from_pretrained`` expects; return the total bytes written."""
        if self.buffer:
            self._flush()
        total = sum((self.directory / f"shard-{i}.tmp").stat().st_size for i in range(len(self.shards)))
        if len(self.shards) == 1:
            (self.directory / "shard-0.tmp").rename(self.directory / "model.safetensors")
            return total
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.directory / f"shard-{i}.tmp").rename(self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return total


def checkpoint_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a safetensors checkpoint folder, one at a time."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no .safetensors weights; tunelab merges safetensors checkpoints only.")
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, handle.get_tensor(name)


def adapter_transforms(adapter_dir: Path) -> dict[str, Transform]:
    """Base weight name -> function giving its merged value, for a PEFT LoRA-family adapter."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("fan_in_fan_out") or config.get("alpha_pattern"):
        raise UserError(f"{adapter_dir} uses fan_in_fan_out or alpha_pattern, which tunelab merge does not support.")
    weights = {k.removeprefix(PEFT_PREFIX): v.float() for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    alpha = float(config["lora_alpha"])
    modules = sorted({k.split(".lora_A")[0] for k in weights if ".lora_A" in k})
    transforms: dict[str, Transform] = {}
    for module in modules:
        if config["peft_type"] == "ADALORA":
            a, b, e = weights[f"{module}.lora_A"], weights[f"{module}.lora_B"], weights[f"{module}.lora_E"]
            factors = (b, a * e, alpha / (config["init_r"] + 1e-5))
        else:
            a, b = weights[f"{module}.lora_A.weight"], weights[f"{module}.lora_B.weight"]
            rank = a.shape[0]
            factors = (b, a, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank))
        magnitude = weights.get(f"{module}.lora_magnitude_vector")
        transforms[f"{module}.weight"] = _merged(*factors, magnitude)
    return transforms


def _merged(b: torch.Tensor, a: torch.Tensor, scale: float, magnitude: torch.Tensor | None) -> Transform:
    """W -> merged W. The full-size product B·A is formed only here, one weight at a time."""

    def apply(weight: torch.Tensor) -> torch.Tensor:
        updated = weight.float() + (b @ a) * scale
        if magnitude is not None:  # DoRA: rescale each output row to its learned magnitude
            updated = (magnitude / torch.linalg.norm(updated, dim=1)).unsqueeze(1) * updated
        return updated.to(weight.dtype)

    return apply


def nf4_roundtrip(quant_type: str, double_quant: bool) -> Transform:
    """The weight as the 4-bit load saw it: quantized and dequantized with the run's settings."""
    import bitsandbytes.functional as bnbf

    def apply(weight: torch.Tensor) -> torch.Tensor:
        packed, state = bnbf.quantize_4bit(weight, quant_type=quant_type, compress_statistics=double_quant)
        return bnbf.dequantize_4bit(packed, state).to(weight.dtype)

    return apply


def quantized_weight_names(model_config) -> set[str]:
    """Weights transformers' 4-bit load quantizes: every linear layer but the output head."""
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model_config)
    head = skeleton.get_output_embeddings()
    return {f"{name}.weight" for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def merge_run(run_dir: str | Path, output_dir: str | Path, qlora_base: str = "dequantized",
              max_shard_bytes: int = 5 * 2**30) -> dict:
    """Write the merged model of ``run_dir`` to ``output_dir`` (atomically); return a small report."""
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    config, recipe = read_run(run_dir)
    artifact = run_dir / recipe.artifact
    if recipe.merge_refusal:
        raise UserError(f'{run_dir} was trained with recipe "{recipe.name}": {recipe.merge_refusal}')
    if not artifact.is_dir():
        raise UserError(f"{run_dir} has no {recipe.artifact}/ folder: the run did not finish; resume it with --resume first.")
    base_dir = artifact if recipe.artifact == "model" else Path(resolve_model_path(config.model.name_or_path))
    if not base_dir.is_dir():
        raise UserError(f"the base model {config.model.name_or_path} is not a local folder; download it first "
                        "(huggingface-cli download) and point model.name_or_path at it.")
    model_config = AutoConfig.from_pretrained(base_dir)
    transforms: dict[str, Transform] = {}
    extra: dict[str, torch.Tensor] = {}
    if recipe.name == "bitfit":
        extra = load_file(artifact / "bitfit.safetensors")
        model_config = _config_with_biases(model_config, extra)
    elif recipe.artifact == "adapter":
        transforms = adapter_transforms(artifact)
        if recipe.name == "qlora" and qlora_base == "dequantized":
            roundtrip = nf4_roundtrip(config.recipe.quant_type, config.recipe.double_quant)
            for name in quantized_weight_names(model_config):
                delta = transforms.get(name)
                transforms[name] = roundtrip if delta is None else (lambda w, d=delta: d(roundtrip(w)))

    with atomic_dir(output_dir) as staging:
        writer = ShardWriter(staging, max_shard_bytes)
        names = set()
        for name, tensor in checkpoint_tensors(base_dir):
            writer.add(name, transforms.get(name, lambda w: w)(tensor) if name not in extra else extra[name])
            names.add(name)
        for name, tensor in extra.items():
            if name not in names:
                writer.add(name, tensor)
        if extra:  # BitFit: biases the new config flags declare but training did not touch
            bias_dtype = next(iter(extra.values())).dtype
            for name, tensor in _zero_biases(model_config, names | set(extra), bias_dtype).items():
                writer.add(name, tensor)
        total = writer.close()
        model_config.save_pretrained(staging)
        _generation_config(base_dir, model_config).save_pretrained(staging)
        AutoTokenizer.from_pretrained(artifact).save_pretrained(staging)
    merged = sorted(transforms) if recipe.artifact == "adapter" else []
    return {"recipe": recipe.name, "output": str(output_dir), "bytes": total, "shards": len(writer.shards),
            "peak_buffer_bytes": writer.peak_bytes, "merged_weights": len(merged), "qlora_base": qlora_base
            if recipe.name == "qlora" else None}


def _generation_config(base_dir: Path, model_config) -> GenerationConfig:
    try:
        return GenerationConfig.from_pretrained(base_dir)
    except OSError:
        return GenerationConfig.from_model_config(model_config)


def _config_with_biases(model_config, biases: dict[str, torch.Tensor]):
    """Turn on the architecture's bias flags (Llama: attention_bias, mlp_bias) that the trained biases need."""
    attention = any(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in biases)
    mlp = any(n.split(".")[-2] in ("gate_proj", "up_proj", "down_proj") for n in biases)
    updated = type(model_config).from_dict(model_config.to_dict())
    if attention and hasattr(updated, "attention_bias"):
        updated.attention_bias = True
    if mlp and hasattr(updated, "mlp_bias"):
        updated.mlp_bias = True
    with init_empty_weights():
        expected = {name for name, _ in AutoModelForCausalLM.from_config(updated).named_parameters()}
    homeless = sorted(set(biases) - expected)
    if homeless:
        raise UserError(f"the trained bias {homeless[0]} has no place in a plain {updated.model_type} model, so the "
                        "merged folder could not load without tunelab; serve the BitFit adapter with load_trained instead.")
    return updated


def _zero_biases(model_config, present: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zero tensors for biases the (updated) config declares but training did not touch, e.g. Llama's v_proj
    bias when only q_proj got one: the flag gives every projection a bias, and zero is what the model had."""
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model_config)
    return {name: torch.zeros(p.shape, dtype=dtype)
            for name, p in skeleton.named_parameters() if name.endswith(".bias") and name not in present}
