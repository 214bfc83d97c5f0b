"""Configuration: ``get_cfg()`` gives every key with its default; see ``defaults.py``."""

from .config import CfgNode, ConfigError, Key, load_yaml_with_base
from .defaults import get_cfg

__all__ = ["CfgNode", "ConfigError", "Key", "get_cfg", "load_yaml_with_base"]
