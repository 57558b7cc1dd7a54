"""Config schema and loading."""

from tunelab.config.load import config_to_yaml, load_config, parse_config
from tunelab.config.schema import Config, RecipeOptions

__all__ = ["Config", "RecipeOptions", "config_to_yaml", "load_config", "parse_config"]
