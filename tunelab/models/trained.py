"""Load what a run trained, from its run directory, exactly as it was trained.

The run's own ``config.yaml`` says which base, dtype and quantization to rebuild
and which recipe knows its artifact; the recipe's ``load_artifact`` then restores
the trained weights strictly (a GateRA adapter with its gates, BitFit biases with
the biases it added), so no custom weight is silently dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tunelab.config import Config, parse_config
from tunelab.errors import UserError
from tunelab.models.load import keep_4bit_layout, load_model, resolve_dtype
from tunelab.recipes import Recipe, get_recipe_class


def read_run(run_dir: str | Path) -> tuple[Config, Recipe]:
    """The resolved config a run saved, and its recipe; a user error for a folder that is no run."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{run_dir} is not a tunelab run directory (no config.yaml); point at the folder tunelab train wrote.")
    config = parse_config(yaml.safe_load(config_path.read_text()), source=str(config_path))
    return config, get_recipe_class(config.recipe.name)(config.recipe)


def load_trained(run_dir: str | Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) of the run saved in ``run_dir``."""
    config, recipe = read_run(run_dir)
    artifact = Path(run_dir) / recipe.artifact
    if not artifact.is_dir():
        raise UserError(f"{run_dir} has no {recipe.artifact}/ folder; the run did not finish (resume it with --resume).")
    if recipe.artifact == "model":
        model = AutoModelForCausalLM.from_pretrained(artifact, dtype=resolve_dtype(config.model.dtype))
    else:
        model = recipe.load_artifact(load_model(config.model, **recipe.load_kwargs(config)), artifact)
    return model.eval(), AutoTokenizer.from_pretrained(artifact)


def load_model_or_run(reference: str | Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A tunelab run folder (its trained model) or a Hugging Face model folder, in eval mode."""
    path = Path(reference)
    if (path / "config.yaml").is_file():
        return load_trained(path)
    if (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        keep_4bit_layout(model)  # a folder saved already quantized loads 4-bit layers too
        return model.eval(), AutoTokenizer.from_pretrained(path)
    raise UserError(f"{reference} is neither a tunelab run folder (config.yaml) nor a Hugging Face model folder (config.json).")


def load_run_base(run_dir: str | Path) -> torch.nn.Module:
    """The base model a run started from, loaded as that run loaded it (e.g. in 4 bit for QLoRA)."""
    config, recipe = read_run(run_dir)
    return load_model(config.model, **recipe.load_kwargs(config)).eval()
