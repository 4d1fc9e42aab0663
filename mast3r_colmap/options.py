"""pycolmap option objects built from nested dicts: defaults of ours, then the caller's, checked by name.

pycolmap's option classes (``IncrementalPipelineOptions``, ``TwoViewGeometryOptions``, ...) take a
nested dict and give it back with ``todict()``; hloc passes options the same way. :func:`build` merges
the caller's dict (or option object) over our defaults over the class defaults, so a misspelt key is an
error naming the known ones instead of being silently ignored.

:func:`parse_option_args` reads command-line ``key=value`` words (``--mapper-options``,
``--verification-options``) into such a nested dict, as hloc's ``--mapper_options`` does: dotted keys
reach into the nested ``todict()``, values are Python literals checked against the default's type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import ast
import os
from typing import Any, Optional

__all__ = ["build", "merge", "parse_option_args"]


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
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict or a pycolmap.{cls.__name__}, got {type(options).__name__}")
    merged = merge(merge(cls().todict(), defaults or {}), dict(options or {}))
    try:
        return cls(_set_seeds(merged, seed) if seed is not None else merged)
    except TypeError as exc:  # pycolmap: a value of the wrong type ("Failed to merge dict into class")
        raise ValueError(f"bad {cls.__name__}: {exc}") from None


def _convert(key: str, text: str, default: Any) -> Any:
    """The value of ``key=text`` as the type of ``default``; ValueError naming the key otherwise."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = text  # a bare word: only a string (or enum / path) option takes it
    members = getattr(type(default), "__members__", None)  # enum.Enum or a pycolmap (pybind11) enum
    if isinstance(members, Mapping) and not isinstance(default, (bool, int, float, str)):
        if isinstance(value, str) and value in members:
            return value
        raise ValueError(f"option {key!r} takes one of {', '.join(members)}, got {text!r}")
    if isinstance(default, os.PathLike):
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise ValueError(f"option {key!r} takes a path, got {text!r}")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (list, tuple, set)):
        ok = isinstance(value, (list, tuple, set))
        value = type(default)(value) if ok else value
    elif isinstance(default, Mapping):
        ok = isinstance(value, Mapping)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"option {key!r} takes a value of type {type(default).__name__} (default {default!r}), "
                         f"got {text!r}")
    return value


def parse_option_args(args: Sequence[str] | None, cls: type) -> dict[str, Any]:
    """The nested options dict of command-line words ``key=value`` for the pycolmap options class ``cls``.

    As hloc's ``--mapper_options``, with nested keys: ``mapper.init_min_num_inliers=50`` sets
    ``{"mapper": {"init_min_num_inliers": 50}}`` (dotted keys walk the nested ``cls().todict()``). A value
    is a Python literal (``ast.literal_eval``, never ``eval``) of the default's type: an int is taken where
    a float is expected, a bare word where a string, a path or an enum member name is. A later word
    overrides an earlier one. The result is meant for :func:`build`.

    Raises:
        ValueError: a word without ``=``, an unknown key (naming the known ones) or a value of another type.
    """
    defaults = cls().todict()
    out: dict[str, Any] = {}
    for arg in args or ():
        key, sep, text = str(arg).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"bad option {arg!r}: expected key=value (e.g. "
                             f"{next(iter(defaults))}={defaults[next(iter(defaults))]!r})")
        parts = key.split(".")
        level, target = defaults, out
        for depth, part in enumerate(parts):
            if not isinstance(level, Mapping) or part not in level:
                where = ".".join(parts[:depth])
                known = ", ".join(sorted(level)) if isinstance(level, Mapping) else "none (not a group)"
                raise ValueError(f"unknown {cls.__name__} option {key!r}"
                                 f"{f' ({where!r} has no {part!r})' if where else ''}; known: {known}")
            if depth < len(parts) - 1:
                level = level[part]
                if not isinstance(level, Mapping):
                    continue  # reported at the next part
                target = target.setdefault(part, {})  # a dict, also when an earlier word set the group
        value = _convert(key, text.strip(), level[parts[-1]])
        target[parts[-1]] = value
    return out

