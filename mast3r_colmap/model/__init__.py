"""The MASt3R network and its checkpoint loader."""

from .mast3r import CONFIGS, ConfigError, Encoding, MASt3R, MASt3RConfig

__all__ = ["CONFIGS", "ConfigError", "Encoding", "MASt3R", "MASt3RConfig"]
