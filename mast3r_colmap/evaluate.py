"""Localisation accuracy as visuallocalization.net reports it.

For each ground-truth query, the position error is the distance between the estimated and the true
camera centres (``c = -R^T t`` of cam_from_world) and the rotation error the angle of ``R_est R_gt^T`` in
degrees. Recall at a threshold pair (meters, degrees) is the fraction of ground-truth queries with both
errors within it (inclusive); a query missing from the results counts as a failure (infinite errors). The
default thresholds are Aachen Day-Night's (0.25 m, 2°), (0.5 m, 5°), (5 m, 10°). Medians are taken over
all ground-truth queries, the missing ones included as infinite errors.

Poses are ``name qw qx qy qz tx ty tz`` lines (results files, :func:`read_poses`) or a dict of
``pycolmap.Rigid3d``, ``(qvec_wxyz, tvec)`` pairs or 3x4 / 4x4 matrices. A ground-truth name that is not
in the results is looked up by its basename (results use basenames, ground truth may use full names).

Command line: ``python -m mast3r_colmap.evaluate RESULTS GT [--thresholds 0.25,2 0.5,5 5,10]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy.spatial.transform import Rotation

from . import cli
from .cli import EXIT_BAD_INPUT  # noqa: F401 (re-exported: the exit code of bad input)
from .utils import text_records

__all__ = ["THRESHOLDS", "build_parser", "evaluate", "format_recall", "main", "pose_error", "read_poses"]

logger = logging.getLogger(__name__)

#: (max position error in meters, max rotation error in degrees) of Aachen Day-Night.
THRESHOLDS: Tuple[Tuple[float, float], ...] = ((0.25, 2.0), (0.5, 5.0), (5.0, 10.0))

Pose = Tuple[np.ndarray, np.ndarray]  # (R (3, 3), t (3,)) of cam_from_world
PosesLike = Union[str, os.PathLike, Mapping[str, Any]]


def _from_qt(qvec_wxyz: Sequence[float], tvec: Sequence[float], where: str = "") -> Pose:
    q = np.asarray(qvec_wxyz, np.float64).reshape(4)
    t = np.asarray(tvec, np.float64).reshape(3)
    norm = np.linalg.norm(q)
    if not (np.isfinite(q).all() and np.isfinite(t).all() and norm > 1e-12):
        raise ValueError(f"{where}invalid pose (quaternion {q.tolist()}, translation {t.tolist()})")
    return Rotation.from_quat(q[[1, 2, 3, 0]] / norm).as_matrix(), t


def _as_pose(value: Any, name: str) -> Pose:
    """A pose given as Rigid3d, (qvec wxyz, tvec), or a 3x4 / 4x4 matrix -> (R, t)."""
    if hasattr(value, "rotation") and hasattr(value, "translation"):      # pycolmap.Rigid3d
        return np.asarray(value.rotation.matrix(), np.float64), np.asarray(value.translation, np.float64)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _from_qt(value[0], value[1], f"{name}: ")
    m = np.asarray(value, np.float64)
    if m.shape in ((3, 4), (4, 4)):
        return m[:3, :3], m[:3, 3]
    raise ValueError(f"{name}: cannot read a pose from {type(value).__name__}")


def read_poses(path: str | os.PathLike) -> Dict[str, Pose]:
    """Read a results file (``name qw qx qy qz tx ty tz`` per line) into ``{name: (R, t)}``.

    Raises:
        ValueError: a missing file, a line with other than 8 fields, a bad number or a repeated name.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"poses file {str(path)!r} does not exist")
    out: Dict[str, Pose] = {}
    for where, parts in text_records(path):
        where += ": "
        if len(parts) != 8:
            raise ValueError(f"{where}expected 'name qw qx qy qz tx ty tz', got {len(parts)} fields")
        try:
            values = [float(v) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"{where}non-numeric pose values") from None
        if parts[0] in out:
            raise ValueError(f"{where}{parts[0]!r} listed twice")
        out[parts[0]] = _from_qt(values[:4], values[4:], where)
    return out


def _poses(source: PosesLike, what: str) -> Dict[str, Pose]:
    if isinstance(source, (str, os.PathLike)):
        return read_poses(source)
    return {str(k): _as_pose(v, f"{what} {k!r}") for k, v in source.items()}


def pose_error(estimate: Pose, truth: Pose) -> Tuple[float, float]:
    """(camera centre distance, rotation angle in degrees) between two cam_from_world poses."""
    (R_e, t_e), (R_g, t_g) = estimate, truth
    c_e, c_g = -R_e.T @ t_e, -R_g.T @ t_g
    cos = np.clip((np.trace(R_e @ R_g.T) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.linalg.norm(c_e - c_g)), float(np.degrees(np.arccos(cos)))


def evaluate(results: PosesLike, ground_truth: PosesLike,
             thresholds: Sequence[Tuple[float, float]] = THRESHOLDS) -> Dict[str, Any]:
    """Recall at each (meters, degrees) threshold and median errors over the ground-truth queries.

    Returns a dict with ``num_queries``, ``num_missing`` (ground-truth queries without a result),
    ``recall`` (list of ``{"max_translation", "max_rotation_deg", "recall"}``, recall in [0, 1]),
    ``median_translation_error``, ``median_rotation_error_deg`` and ``errors``
    (``{name: [translation, rotation_deg]}``, infinite when missing).
    """
    est = _poses(results, "result")
    gt = _poses(ground_truth, "ground truth")
    if not gt:
        raise ValueError("the ground truth holds no query")
    by_base: Dict[str, Optional[str]] = {}
    for name in est:
        base = PurePosixPath(name).name
        by_base[base] = None if base in by_base else name    # None: ambiguous basename
    errors: Dict[str, Tuple[float, float]] = {}
    for name, truth in gt.items():
        key = name if name in est else by_base.get(PurePosixPath(name).name)
        errors[name] = pose_error(est[key], truth) if key is not None else (float("inf"), float("inf"))
    dt = np.array([e[0] for e in errors.values()])
    dr = np.array([e[1] for e in errors.values()])
    recall = [{"max_translation": float(t), "max_rotation_deg": float(r),
               "recall": float(np.mean((dt <= t) & (dr <= r)))} for t, r in thresholds]
    missing = int(np.sum(~np.isfinite(dt)))
    if missing:
        logger.warning("%d of %d ground-truth queries have no result (counted as failures)", missing, len(gt))
    return {"num_queries": len(gt), "num_missing": missing, "recall": recall,
            "median_translation_error": float(np.median(dt)), "median_rotation_error_deg": float(np.median(dr)),
            "errors": {k: [float(a), float(b)] for k, (a, b) in errors.items()}}


def format_recall(stats: Mapping[str, Any]) -> str:
    """``"(0.25m, 2°) / (0.5m, 5°) / (5m, 10°): 80.0 / 90.0 / 100.0 %"`` from :func:`evaluate`'s output."""
    heads = " / ".join(f"({r['max_translation']:g}m, {r['max_rotation_deg']:g}°)" for r in stats["recall"])
    values = " / ".join(f"{100 * r['recall']:.1f}" for r in stats["recall"])
    return f"{heads}: {values} %"


def _threshold(text: str) -> Tuple[float, float]:
    try:
        t, r = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold {text!r}: expected METERS,DEGREES") from None
    if not (t >= 0 and r >= 0):
        raise argparse.ArgumentTypeError(f"threshold {text!r}: values must be >= 0")
    return t, r


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m mast3r_colmap.evaluate", "Recall and median errors of a localisation results file.")
    p.add_argument("results", type=Path, help="results file: 'name qw qx qy qz tx ty tz' per line")
    p.add_argument("ground_truth", type=Path, help="ground-truth poses in the same format")
    p.add_argument("--thresholds", type=_threshold, nargs="+", default=list(THRESHOLDS),
                   help="METERS,DEGREES pairs")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    cli.add_logging_arguments(p)
    return p


def _run(args: argparse.Namespace) -> int:
    stats = evaluate(args.results, args.ground_truth, args.thresholds)
    if args.json:
        print(json.dumps({k: v for k, v in stats.items() if k != "errors"}, indent=2))
    else:
        print(f"{stats['num_queries']} queries ({stats['num_missing']} missing)")
        print(format_recall(stats))
        print(f"median errors: {stats['median_translation_error']:.3f} m, {stats['median_rotation_error_deg']:.3f}°")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m mast3r_colmap.evaluate RESULTS GT``: prints recall and median errors; bad input exits with 2."""
    return cli.main(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
