"""Fine-tuning recipes, one module per method; importing this package registers them all."""

from __future__ import annotations

import importlib
import pkgutil

from tunelab.errors import UserError, did_you_mean

from .base import REGISTRY, Recipe, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def get_recipe_class(name: str) -> type[Recipe]:
    """Look a recipe up by name; an unknown name is a user error with a suggestion."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise UserError(
            f'recipe.name "{name}" is not a recipe{did_you_mean(name, REGISTRY)}; '
            f"choose one of: {known}."
        ) from None


__all__ = ["REGISTRY", "Recipe", "get_recipe_class", "register"]
