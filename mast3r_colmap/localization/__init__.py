"""Localise query images against a reference COLMAP model (hloc's ``localize_sfm`` with any pipeline matcher).

One job per module, in the order data flows:

* :mod:`.parsing`: the input files (query lists with intrinsics, retrieval pairs);
* :mod:`.reference`: the reference model's keypoints and 3D points per image (an LRU cache), and building
  a map from known poses (:func:`triangulate_reference`);
* :mod:`.covisibility`: covisibility pairs (db-db pairs of a triangulation) and clusters (PnP per cluster);
* :mod:`.solve`: matches -> 2D-3D correspondences -> absolute pose, for one query and for all
  (:func:`localize`);
* :mod:`.results`: :class:`QueryResult`, the results file and the per-query logs;
* :mod:`.cli`: the command line (``python -m mast3r_colmap.localization``).

Conventions. Keypoints handed in (``ref_keypoints``) and matches are in hloc's convention ((0, 0) is the
centre of the top-left pixel). The model's ``points2D`` and pycolmap's camera models are in COLMAP's
((0, 0) is the top-left corner): the reference keypoints are checked against the model's points2D with
the +0.5 shift, and the query's 2D points get +0.5 before PnP. Poses are ``cam_from_world``
(world-to-camera).

Results (:func:`write_results`) have one line ``name qw qx qy qz tx ty tz`` per query, the basename by
default (the visuallocalization.net format). A query that cannot be localised still gets a line: the pose
of its first retrieved reference image, as hloc does, with a warning and a ``reason`` in its log entry.
Per-query logs are JSON lines beside the results (:func:`logs_path`).
"""

from .covisibility import covisibility_clusters, pairs_from_covisibility
from .parsing import read_queries, read_retrieval
from .reference import reference_keypoints, triangulate_reference
from .results import QueryResult, logs_path, write_logs, write_results
from .solve import LocalizationConfig, localize

__all__ = [
    "LocalizationConfig",
    "QueryResult",
    "covisibility_clusters",
    "localize",
    "logs_path",
    "pairs_from_covisibility",
    "read_queries",
    "read_retrieval",
    "reference_keypoints",
    "triangulate_reference",
    "write_logs",
    "write_results",
]
