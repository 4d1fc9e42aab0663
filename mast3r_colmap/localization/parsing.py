"""The input files of localisation: query lists with intrinsics and retrieval pairs.

* :func:`read_queries`: hloc's ``*_queries_with_intrinsics.txt``, ``name MODEL W H params...`` per line
  (COLMAP's camera convention), or just ``name`` for a query whose focal length is estimated (the
  parser is :func:`~mast3r_colmap.cameras.read_camera_list`, shared with ``--camera-intrinsics``);
* :func:`read_retrieval`: a pairs file ``query db`` per line, best first, as ``{query: [db, ...]}``.

Errors are ValueErrors naming the file and line.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional

import pycolmap

from ..cameras import read_camera_list

__all__ = ["read_queries", "read_retrieval"]


def read_queries(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Dict[str, Optional[pycolmap.Camera]]:
    """Read query lists (hloc's ``*_queries_with_intrinsics.txt``): ``name MODEL W H params...`` per line.

    A line holding only a name is a query without intrinsics (``None``: the focal length is estimated).
    Blank lines and ``#`` comments are skipped. Several files are read in the given order.

    Raises:
        ValueError: a missing file, a malformed line, an unknown model, a wrong number of parameters or a
            repeated name (the message names the file and line).
    """
    return read_camera_list(paths, what="queries file")


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
