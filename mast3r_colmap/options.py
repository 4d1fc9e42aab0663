"""pycolmap option objects built from nested dicts: defaults of ours, then the caller's, checked by name.

pycolmap's option classes (``IncrementalPipelineOptions``, ``TwoViewGeometryOptions``, ...) take a
nested dict and give it back with ``todict()``; hloc passes options the same way. :func:`build` merges
the caller's dict (or option object) over our defaults over the class defaults, so a misspelt key is an
error naming the known ones instead of being silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

__all__ = ["build", "merge"]


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` merged into a copy of ``base``, recursively; a key unknown to ``base`` raises ValueError."""
    out = dict(base)
    for key, value in update.items():
        if key not in out:
            raise ValueError(f"unknown option {key!r}; known: {', '.join(sorted(out))}")
        out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out[key], Mapping) else value
    return out


def _set_seeds(options: dict[str, Any], seed: int) -> dict[str, Any]:
    """Set every ``random_seed`` of a nested options dict that is still -1 (pycolmap's "random")."""
    for key, value in options.items():
        if isinstance(value, dict):
            _set_seeds(value, seed)
        elif key == "random_seed" and value == -1:
            options[key] = seed
    return options


def build(cls: type, options: Mapping[str, Any] | Any | None = None, defaults: Mapping[str, Any] | None = None,
          seed: Optional[int] = None) -> Any:
    """A ``cls`` (a pycolmap options class) from its defaults, ``defaults`` and ``options`` (a dict or a
    ``cls`` instance), in that order; with ``seed``, every ``random_seed`` left at -1 is set to it."""
    if isinstance(options, cls):
        options = options.todict()
    merged = merge(merge(cls().todict(), defaults or {}), dict(options or {}))
    return cls(_set_seeds(merged, seed) if seed is not None else merged)
