"""BitFit (Ben Zaken et al., 2022): train only the bias terms.

Llama-family models have no biases at all, so BitFit there means *adding*
zero-initialised biases to the targeted linear layers and training only those
(the model's output is unchanged until they train). Architectures with biases
(e.g. Qwen2's q/k/v projections) train the ones they have, plus any added to
targeted linears that lack one. The adapter is just those bias vectors, saved as
``bitfit.safetensors`` under their full parameter names, with ``bitfit.json``
listing which biases were added so ``load_artifact`` can recreate them.
Llama's ``attention_bias``/``mlp_bias`` config flags can hold them in a merged model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunelab.config.schema import Config
from tunelab.errors import UserError

from .base import Recipe, register
from .lora import TargetedOptions

ADDED_KEY = "tunelab_bitfit_added"


class BitfitOptions(TargetedOptions):
    # Give targeted linear layers without a bias a zero-initialised one (needed for Llama).
    add_missing_biases: bool = True


def targeted_linears(model: torch.nn.Module, target_modules: str | list[str]) -> dict[str, torch.nn.Linear]:
    """Linear layers selected by ``target_modules`` (same rules as LoRA's option)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if target_modules == "all-linear":
            hit = module is not head
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            found[name] = module
    return found


def add_zero_bias(linear: torch.nn.Linear) -> None:
    linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device))


@register
class Bitfit(Recipe):
    name = "bitfit"
    description = "Train only bias terms (zero-initialised biases are added where the model has none)."
    Options = BitfitOptions
    artifact = "adapter"
    typical_trainable = "0.017% (biases added to all linear layers)"
    options: BitfitOptions

    def build(self, model: torch.nn.Module, config: Config) -> torch.nn.Module:
        linears = targeted_linears(model, self.options.target_modules)
        if not linears:
            raise UserError(
                f"recipe.target_modules {self.options.target_modules!r} matched no linear layer of "
                f"{config.model.name_or_path}; use 'all-linear' or names such as [q_proj, v_proj]."
            )
        added = []
        if self.options.add_missing_biases:
            for name, linear in linears.items():
                if linear.bias is None:
                    add_zero_bias(linear)
                    added.append(name)
        setattr(model, ADDED_KEY, added)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.endswith(".bias"))
        return model

    def save(self, model: torch.nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        values = state_dict if state_dict is not None else dict(model.named_parameters())
        trained = [name for name, p in model.named_parameters() if p.requires_grad]
        biases = {name: values[name].detach().contiguous() for name in trained}
        save_file(biases, directory / "bitfit.safetensors")
        manifest = {"added_biases": getattr(model, ADDED_KEY, []), "trained_biases": sorted(biases)}
        (directory / "bitfit.json").write_text(json.dumps(manifest, indent=2) + "\n")

    def load_artifact(self, base: torch.nn.Module, directory: Path) -> torch.nn.Module:
        manifest = json.loads((directory / "bitfit.json").read_text())
        modules = dict(base.named_modules())
        for name in manifest["added_biases"]:
            add_zero_bias(modules[name])
        setattr(base, ADDED_KEY, manifest["added_biases"])
        biases = load_file(directory / "bitfit.safetensors")
        parameters = dict(base.named_parameters())
        missing = sorted(set(biases) - set(parameters))
        if missing:
            raise UserError(f"{directory} holds biases the base model has no place for ({missing[0]}, ...); "
                            "load it onto the base model it was trained from.")
        with torch.no_grad():
            for name, value in biases.items():
                parameters[name].copy_(value)
        return base
