"""Image-pair selection ("which pairs to match") and hloc pairs files.

Image names are hloc-style relative POSIX paths (``"db/1045.jpg"``). A pair is a ``(name0, name1)`` tuple.

Conventions shared by every strategy (:func:`exhaustive`, :func:`sequential`, :func:`pairs_from_descriptors`,
:func:`retrieval_graph`, :func:`pairs_from_similarity` and :func:`pairs_from_spec`):

* pairs are **unordered**: a pair and its reverse count once, and self-pairs are never produced;
* each pair is written in list order, ``(names[i], names[j])`` with ``i < j``;
* the returned list is sorted by ``(i, j)``, i.e. by the index of the first, then of the second image in
  the given name list, so the output is deterministic;
* fewer than two images give an empty list; window / neighbour / key counts larger than the number of
  images are clipped.

Strategies follow MASt3R-SfM's ``make_pairs`` (``complete``, ``swin``, ``logwin``, ``retrieval-Na-k``) and
hloc's ``pairs_from_*`` scripts; pairs files use hloc's text format (one ``name0 name1`` per line, no
trailing newline).

* :mod:`.strategies`: exhaustive and sequential pairs;
* :mod:`.files`: reading and writing hloc pairs files;
* :mod:`.similarity`: top-k pairs and MASt3R-SfM's graph from global descriptors or an image similarity;
* :mod:`.spec`: the command line's ``--pairs`` spec;
* :mod:`.common`: the conventions above (name checks, canonical order).
"""

from .common import Pair
from .files import read_pairs, write_pairs
from .similarity import (farthest_point_sampling, mast3r_sfm_graph, pairs_from_descriptors, pairs_from_similarity,
                         retrieval_graph, topk_neighbors)
from .spec import pairs_from_spec
from .strategies import exhaustive, sequential

__all__ = [
    "Pair",
    "exhaustive",
    "sequential",
    "read_pairs",
    "write_pairs",
    "topk_neighbors",
    "pairs_from_descriptors",
    "farthest_point_sampling",
    "mast3r_sfm_graph",
    "retrieval_graph",
    "pairs_from_similarity",
    "pairs_from_spec",
]
