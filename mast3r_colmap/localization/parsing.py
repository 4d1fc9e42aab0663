"""The input files of localisation: query lists with intrinsics and retrieval pairs.

* :func:`read_queries`: hloc's ``*_queries_with_intrinsics.txt``, ``name MODEL W H params...`` per line
  (COLMAP's camera convention), or just ``name`` for a query whose focal length is estimated;
* :func:`read_retrieval`: a pairs file ``query db`` per line, best first, as ``{query: [db, ...]}``.

Errors are ValueErrors naming the file and line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pycolmap

from ..utils import text_records

__all__ = ["read_queries", "read_retrieval"]


def _camera_from_tokens(tokens: Sequence[str], where: str) -> pycolmap.Camera:
    """A camera from ``MODEL WIDTH HEIGHT PARAMS...``; ValueError naming ``where`` otherwise."""
    model = tokens[0]
    if model not in pycolmap.CameraModelId.__members__ or model == "INVALID":
        raise ValueError(f"{where}: unknown camera model {model!r}")
    try:
        width, height = int(tokens[1]), int(tokens[2])
        params = [float(p) for p in tokens[3:]]
    except (IndexError, ValueError):
        raise ValueError(f"{where}: expected 'name MODEL WIDTH HEIGHT PARAMS...'") from None
    if width <= 0 or height <= 0 or not all(np.isfinite(params)):
        raise ValueError(f"{where}: bad image size or parameters")
    expected = len(pycolmap.Camera.create_from_model_name(0, model, 1.0, width, height).params)
    if len(params) != expected:
        raise ValueError(f"{where}: camera model {model} takes {expected} parameters, got {len(params)}")
    return pycolmap.Camera(model=model, width=width, height=height, params=params)


def read_queries(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Dict[str, Optional[pycolmap.Camera]]:
    """Read query lists (hloc's ``*_queries_with_intrinsics.txt``): ``name MODEL W H params...`` per line.

    A line holding only a name is a query without intrinsics (``None``: the focal length is estimated).
    Blank lines and ``#`` comments are skipped. Several files are read in the given order.

    Raises:
        ValueError: a missing file, a malformed line, an unknown model, a wrong number of parameters or a
            repeated name (the message names the file and line).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: Dict[str, Optional[pycolmap.Camera]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"queries file {str(path)!r} does not exist")
        for where, tokens in text_records(path):
            if tokens[0] in out:
                raise ValueError(f"{where}: query {tokens[0]!r} listed twice")
            out[tokens[0]] = _camera_from_tokens(tokens[1:], where) if len(tokens) > 1 else None
    return out


def read_retrieval(path: str | os.PathLike, num_loc: Optional[int] = None) -> Dict[str, List[str]]:
    """Read a query pairs file (``query db`` per line, best first) into ``{query: [db, ...]}``.

    The file order is kept; repeated pairs are dropped; ``num_loc`` keeps the first ``num_loc`` per query.
    """
    from ..pairs import read_pairs

    if num_loc is not None and int(num_loc) < 1:
        raise ValueError(f"num_loc must be >= 1, got {num_loc}")
    out: Dict[str, List[str]] = {}
    for query, db in read_pairs(path):
        lst = out.setdefault(query, [])
        if db != query and db not in lst and (num_loc is None or len(lst) < num_loc):
            lst.append(db)
    return out
