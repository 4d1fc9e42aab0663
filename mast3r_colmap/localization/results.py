"""What localising a query yields, and the files it is written to.

* :class:`QueryResult`: the pose (``cam_from_world``, world-to-camera) of one query and what led to it;
  ``success`` False marks a fallback pose, with a ``reason``. :class:`QueryFailure` carries that reason.
* :func:`write_results`: one line ``name qw qx qy qz tx ty tz`` per query, the basename by default (the
  visuallocalization.net format); :func:`write_logs`: one JSON object per query (:meth:`QueryResult.log_entry`)
  in ``<stem>_logs.jsonl`` beside the results (:func:`logs_path`). Both are written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import pycolmap

from ..utils import atomic_write_text

__all__ = ["QueryFailure", "QueryResult", "logs_path", "write_logs", "write_results"]

logger = logging.getLogger(__name__)


class QueryFailure(Exception):
    """A query that cannot be localised, with the reason (never escapes :func:`~.solve.localize`)."""


@dataclass
class QueryResult:
    """The pose of one query and what led to it (``success`` False: a fallback pose, see ``reason``)."""

    name: str
    cam_from_world: pycolmap.Rigid3d
    success: bool
    reason: Optional[str] = None
    camera: Optional[pycolmap.Camera] = None
    focal_estimated: bool = False
    retrieved: List[str] = field(default_factory=list)
    fallback: Optional[str] = None                     # reference image whose pose was used on failure
    num_matches: int = 0                               # one-to-one keypoint matches over all pairs
    matches_per_db: Dict[str, int] = field(default_factory=dict)
    correspondences_per_db: Dict[str, int] = field(default_factory=dict)  # distinct, by first db image
    num_correspondences: int = 0                       # distinct 2D-3D correspondences used for PnP
    num_inliers: int = 0
    clusters: List[List[str]] = field(default_factory=list)
    best_cluster: Optional[int] = None
    times: Dict[str, float] = field(default_factory=dict)
    inlier_mask: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def qvec(self) -> np.ndarray:
        """Rotation quaternion (w, x, y, z) of ``cam_from_world`` (pycolmap stores x, y, z, w)."""
        return np.asarray(self.cam_from_world.rotation.quat, np.float64)[[3, 0, 1, 2]]

    @property
    def tvec(self) -> np.ndarray:
        return np.asarray(self.cam_from_world.translation, np.float64)

    def log_entry(self) -> Dict[str, Any]:
        """A JSON-able summary (no per-correspondence arrays)."""
        cam = None
        if self.camera is not None:
            cam = {"model": self.camera.model.name, "width": int(self.camera.width),
                   "height": int(self.camera.height), "params": [float(p) for p in self.camera.params]}
        return {
            "name": self.name, "success": self.success, "reason": self.reason,
            "qvec": [float(v) for v in self.qvec], "tvec": [float(v) for v in self.tvec],
            "camera": cam, "focal_estimated": self.focal_estimated,
            "retrieved": list(self.retrieved), "fallback": self.fallback,
            "num_matches": self.num_matches, "matches_per_db": dict(self.matches_per_db),
            "correspondences_per_db": dict(self.correspondences_per_db),
            "num_correspondences": self.num_correspondences, "num_inliers": self.num_inliers,
            "inlier_ratio": (self.num_inliers / self.num_correspondences) if self.num_correspondences else 0.0,
            "clusters": [list(c) for c in self.clusters], "best_cluster": self.best_cluster,
            "time": {k: round(float(v), 4) for k, v in self.times.items()},
        }


def logs_path(results_path: str | os.PathLike) -> Path:
    """Where the per-query logs of a results file go: ``<stem>_logs.jsonl`` beside it."""
    p = Path(results_path)
    return p.with_name(p.stem + "_logs.jsonl")


def write_results(path: str | os.PathLike, results: Mapping[str, QueryResult], full_names: bool = False) -> Path:
    """Write ``name qw qx qy qz tx ty tz`` lines (cam_from_world, w first) in the order of ``results``.

    ``name`` is the basename (the visuallocalization.net format) unless ``full_names``.
    """
    lines, seen = [], set()
    for name, r in results.items():
        out_name = name if full_names else PurePosixPath(name).name
        if out_name in seen:
            logger.warning("two queries are written as %r; use full names to tell them apart", out_name)
        seen.add(out_name)
        lines.append(" ".join([out_name] + [repr(float(v)) for v in (*r.qvec, *r.tvec)]))
    path = atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    logger.info("wrote %d poses to %s", len(lines), path)
    return path


def write_logs(path: str | os.PathLike, results: Mapping[str, QueryResult]) -> Path:
    """Write one JSON object per query (:meth:`QueryResult.log_entry`) per line."""
    return atomic_write_text(path, "".join(json.dumps(r.log_entry()) + "\n" for r in results.values()))
