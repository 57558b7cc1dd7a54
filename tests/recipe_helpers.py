"""Shared by the recipe tests: train a tiny config quickly, and the tiny model's shapes."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import yaml
from tunelab.recipes import get_recipe_class

from tunelab.config import Config, load_config, parse_config
from tunelab.models.load import load_model
from tunelab.train.run import TrainResult, train

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["lora", "qlora", "dora", "rslora", "adalora", "gatera", "prefix", "ptuning", "bitfit", "full"]

# builtin:tiny-llama: hidden 128, MLP 512, 2 KV heads of 32 (k/v out 64), 2 layers, vocab 512.
HIDDEN, INTER, KV, LAYERS, VOCAB = 128, 512, 64, 2, 512
# (in, out) of the 7 linear layers of one block: q, k, v, o, gate, up, down.
LINEARS = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)]

_cache: dict[tuple, TrainResult] = {}


def train_tiny(name: str, out_dir: Path, *overrides: str, steps: int = 30) -> TrainResult:
    """Train ``configs/tiny/<name>.yaml`` for ``steps`` logged-every-step steps (cached per arguments)."""
    key = (name, steps, overrides)
    if key not in _cache:
        with contextlib.chdir(REPO):
            config = load_config(
                f"configs/tiny/{name}.yaml",
                [f"training.max_steps={steps}", "training.logging_steps=1", "eval.max_samples=16",
                 "eval.exact_match=false", *overrides],
            )
            _cache[key] = train(config, output_dir=out_dir / f"{name}-{len(_cache)}")
    return _cache[key]


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    input_ids = torch.randint(3, 500, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.float()


def tiny_config(recipe: dict, **training) -> Config:
    """A config for the tiny model with the given recipe options (``dtype`` may be passed too)."""
    return parse_config({
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": training.pop("dtype", "float32")},
        "recipe": recipe,
        "data": {"datasets": [{"path": str(REPO / "configs/data/quickstart/train.jsonl"), "format": "prompt_completion"}]},
        "training": {"max_steps": 10, **training},
    })


def build(recipe: dict, **training) -> torch.nn.Module:
    """The recipe's trainable model on the tiny base, without training."""
    config = tiny_config(recipe, **training)
    recipe_obj = get_recipe_class(config.recipe.name)(config.recipe)
    torch.manual_seed(0)
    return recipe_obj.build(load_model(config.model, **recipe_obj.load_kwargs(config)), config)


def run_yaml(recipe: str = "lora", **training) -> str:
    """YAML of a small r=8 run of ``recipe`` on the quickstart data, no eval generation; ``training`` fields added."""
    return yaml.safe_dump({
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "recipe": {"name": recipe, "r": 8, "alpha": 16},
        "data": {"datasets": [{"path": str(REPO / "configs/data/quickstart/train.jsonl"), "format": "prompt_completion"}],
                 "max_length": 64},
        "training": {"micro_batch_size": 8, "learning_rate": 1.0e-3, "seed": 3, **training},
        "eval": {"before_training": False, "exact_match": False},
    })
