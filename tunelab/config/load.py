"""Load a YAML config with OmegaConf, apply ``key=value`` overrides, validate it.

``load_config`` is the single entry point for ``train`` and ``validate``: it runs
every check that needs no model or data in memory (schema, recipe options,
cross-field rules, input paths) and turns each failure into one plain sentence
raised as ``UserError``.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from tunelab.config.schema import Config, RecipeOptions
from tunelab.errors import UserError, did_you_mean, first_line


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, merge, resolve and validate a config; raise ``UserError`` on any problem."""
    raw = read_resolved(Path(path), overrides)
    config = parse_config(raw, source=str(path))
    _check_inputs(config)
    return config


def parse_config(raw: Any, source: str = "config") -> Config:
    """Validate an already-resolved mapping (from YAML or a saved run) into a ``Config``."""
    from tunelab.launch.strategy import check_strategy
    from tunelab.recipes import get_recipe_class

    if not isinstance(raw, dict):
        raise UserError(f"{source} must be a mapping of keys at the top level, got {type(raw).__name__}.")
    recipe_options, errors = _parse_recipe(raw.get("recipe"))
    # A placeholder keeps the recipe's own errors from reappearing as "missing recipe".
    raw = {**raw, "recipe": recipe_options or RecipeOptions(name="?")}
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        errors.extend(explain_errors(exc, Config))
    if errors:
        raise UserError("\n".join(dict.fromkeys(errors)))

    get_recipe_class(config.recipe.name)(config.recipe).check(config)
    check_strategy(config)
    return config


def _parse_recipe(recipe_raw: Any) -> tuple[RecipeOptions | None, list[str]]:
    """Validate ``recipe`` (a name, or a mapping with ``name``) with that recipe's own options model."""
    from tunelab.recipes import get_recipe_class

    if recipe_raw is None:
        return None, ['missing required key "recipe"; add e.g. "recipe: lora" (see `tunelab recipes`).']
    return parse_named_options(recipe_raw, "recipe", lambda name: get_recipe_class(name).Options, "{name: lora, r: 16}")


def parse_named_options(
    raw: Any, key: str, options_of: Callable[[str], type[BaseModel]], example: str
) -> tuple[Any, list[str]]:
    """Validate ``raw`` (a name, or a mapping with ``name``) with the options model its name selects.

    Recipes, a distillation student and synth strategies are all chosen this way. ``options_of``
    looks the model up and raises ``UserError`` for an unknown name. Returns (options, []) or
    (None, one sentence per problem, keys prefixed with ``key``).
    """
    if isinstance(raw, BaseModel):
        raw = raw.model_dump()
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        return None, [f'"{key}" must be a name or a mapping with a "name" key, e.g. "{key}: {example}".']
    try:
        options_cls = options_of(raw["name"])
    except UserError as exc:
        return None, [str(exc)]
    try:
        return options_cls.model_validate(raw), []
    except ValidationError as exc:
        return None, explain_errors(exc, options_cls, prefix=tuple(key.split(".")))


def config_to_yaml(config: Config) -> str:
    """The fully resolved config as YAML; ``parse_config`` of it gives ``config`` back."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def read_resolved(path: Path, overrides: Sequence[str]) -> Any:
    """The YAML file merged with ``key=value`` overrides and resolved (interpolations), as plain data."""
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; check the path.")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"config file {path} is not valid YAML{line}; fix its syntax.") from exc
    except OSError as exc:  # OmegaConf's answer to a scalar document such as "true"
        raise UserError(f"config file {path} must be a mapping of keys at the top level; see configs/ for examples.") from exc
    except (OmegaConfBaseException, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"config file {path} could not be read: {first_line(exc)}.") from exc
    if not isinstance(cfg, DictConfig):
        raise UserError(f"config file {path} must be a mapping of keys at the top level; see configs/ for examples.")
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f'override "{item}" is not of the form key=value (e.g. training.learning_rate=1e-4).')
    try:
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(cfg, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as exc:
        raise UserError(f"config {path} could not be resolved with its overrides: {first_line(exc)}.") from exc


def _check_inputs(config: Config) -> None:
    """Input paths that must exist before training (model folder, local data files)."""
    from tunelab.data.sources import local_files
    from tunelab.models.load import check_model_reference

    check_model_reference(config.model.name_or_path)
    for key, sources in (
        ("data.datasets", config.data.datasets),
        ("data.eval_datasets", config.data.eval_datasets),
        ("eval.retention_datasets", config.eval.retention_datasets),
    ):
        for index, source in enumerate(sources):
            local_files(source, key=f"{key}[{index}]")


# ---- pydantic errors -> one sentence each -------------------------------------------


def explain_errors(exc: ValidationError, root: type[BaseModel], prefix: tuple = ()) -> list[str]:
    """One sentence per pydantic error, with the dotted key (under ``prefix``) and "did you mean" help."""
    messages = []
    for error in exc.errors():
        loc = prefix + tuple(error["loc"])
        key = _dotted(loc)
        kind = error["type"]
        if kind == "extra_forbidden":
            parent = _model_at(root, tuple(error["loc"])[:-1])
            known = list(parent.model_fields) if parent else []
            hint = did_you_mean(str(loc[-1]), known)
            messages.append(f'unknown key "{key}"{hint}; remove it or fix its spelling.')
        elif kind == "missing":
            messages.append(f'missing required key "{key}"; add it to the config.')
        elif kind == "value_error":
            # Cross-field rules name their keys themselves; field rules get the key prefixed.
            text = _sentence(str(error["ctx"]["error"]))
            messages.append(text if not error["loc"] or key in text else f'"{key}": {text}')
        else:
            got = error.get("input")
            shown = f", got {got!r}" if not isinstance(got, dict | list) else ""
            messages.append(f'"{key}": {error["msg"][0].lower()}{error["msg"][1:]}{shown}.')
    return messages


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (for did-you-mean)."""
    current: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = _inner_model(current.model_fields[part].annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if found is not None:
                return found
    return None


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith(".") else text + "."
