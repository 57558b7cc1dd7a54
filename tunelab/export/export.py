"""``tunelab export``: one trained result in the format the serving side loads.

``gguf`` (llama.cpp), ``safetensors`` (a merged Hugging Face folder) or ``peft``
(the adapter alone with its base recorded, as PEFT and vLLM load it). A run folder
is merged first where the format needs whole weights.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tunelab.errors import UserError
from tunelab.export.gguf_export import export_gguf
from tunelab.export.merge import merge_run
from tunelab.io import atomic_dir
from tunelab.models.load import BUILTIN_PREFIX, resolve_model_path
from tunelab.models.trained import read_run

FORMATS = ("gguf", "safetensors", "peft")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export(source: str | Path, fmt: str, output: str | Path, quant: str = "f16", qlora_base: str = "dequantized") -> dict:
    source, output = Path(source), Path(output)
    if output.exists():
        raise UserError(f"{output} already exists; choose a new --output (tunelab never overwrites an export).")
    is_run = (source / "config.yaml").is_file()
    if not is_run and not (source / "config.json").is_file():
        raise UserError(f"{source} is neither a tunelab run folder (config.yaml) nor a Hugging Face model folder (config.json).")
    if fmt == "safetensors":
        if not is_run:
            raise UserError(f"{source} already is a Hugging Face model folder; use it as it is.")
        return merge_run(source, output, qlora_base=qlora_base)
    if fmt == "peft":
        if not is_run:
            raise UserError(f"{source} is a model folder; --format peft exports the adapter of a tunelab run folder.")
        return _export_peft(source, output)
    if not is_run:
        return export_gguf(source, output, quant)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".tunelab-merge-") as scratch:
        merged = Path(scratch) / "merged"
        merge_run(source, merged, qlora_base=qlora_base)
        return export_gguf(merged, output, quant)


def _export_peft(run_dir: Path, output: Path) -> dict:
    config, recipe = read_run(run_dir)
    adapter = run_dir / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text()) if (adapter / "adapter_config.json").is_file() else {}
    if recipe.artifact != "adapter" or saved.get("peft_type") in (None, "GATERA"):
        raise UserError(f'recipe "{recipe.name}" does not produce a PEFT adapter; export it with --format safetensors'
                        + (" (after checking it merges: see tunelab recipes)." if recipe.mergeable() else "."))
    # Record the base the user named (a hub id stays a hub id); a built-in model is only
    # loadable from tunelab's cache, so its local folder is recorded instead.
    name = config.model.name_or_path
    saved["base_model_name_or_path"] = resolve_model_path(name) if name.startswith(BUILTIN_PREFIX) else name
    with atomic_dir(output) as staging:
        shutil.copy2(adapter / "adapter_model.safetensors", staging / "adapter_model.safetensors")
        (staging / "adapter_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        for path in adapter.iterdir():
            if path.name not in PEFT_FILES and path.is_file() and path.name != "README.md":
                shutil.copy2(path, staging / path.name)  # tokenizer and chat template
    return {"output": str(output), "format": "peft", "peft_type": saved["peft_type"]}
