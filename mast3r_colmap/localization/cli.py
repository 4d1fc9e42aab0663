"""Command line of localisation: argument parsing and wiring only.

    python -m mast3r_colmap.localization --images DIR --reference MODEL_DIR (--database DB | --features H5) \\
        --queries QUERIES.txt --pairs PAIRS.txt --output RESULTS.txt [--preset default|hires] ...

(``python -m mast3r_colmap.localize`` is the same.) ``--preset hires`` is the matcher's ``hires`` preset:
after the 512-px pass, the query is matched coarse-to-fine at full resolution with crops, as MASt3R's
localisation does (``--coarse_to_fine``). Bad input exits with code 2 before the network is loaded
(see :func:`mast3r_colmap.cli.run_cli`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .. import cli
from ..cli import EXIT_BAD_INPUT  # noqa: F401 (re-exported: the exit code of bad input)
from ..keypoints import KeypointConfig
from ..utils import check_writable
from .parsing import read_queries, read_retrieval
from .results import logs_path, write_logs, write_results
from .solve import LocalizationConfig, localize

__all__ = ["build_matcher", "build_parser", "main", "matcher_config"]

logger = logging.getLogger(__name__)

#: Matcher presets of the command line.
PRESETS = ("default", "hires")


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m mast3r_colmap.localization",
                       "Localise query images against a reference COLMAP model with MASt3R matches and PnP.")
    p.add_argument("--images", type=Path, required=True, help="image root (query and reference names are relative)")
    p.add_argument("--reference", type=Path, required=True, help="reference COLMAP model folder (.bin or .txt)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--database", type=Path, help="COLMAP database the reference model was triangulated from")
    src.add_argument("--features", type=Path, help="hloc features.h5 with the reference keypoints")
    p.add_argument("--queries", type=Path, nargs="+", default=None,
                   help="query list(s): 'name MODEL W H params...' per line, or just 'name' to estimate the focal; "
                        "default: the queries of --pairs, focal estimated")
    p.add_argument("--pairs", type=Path, required=True, help="query pairs file 'query ref' per line, best first")
    p.add_argument("--num-loc", type=int, default=None, help="use the first N retrieved images per query (default all)")
    p.add_argument("--preset", choices=PRESETS, default="default",
                   help="default: one 512-px pass; hires: coarse-to-fine matching at full resolution (as MASt3R's "
                        "visloc --coarse_to_fine)")
    p.add_argument("--ransac-thresh", type=float, default=LocalizationConfig.ransac_thresh,
                   help="PnP RANSAC max reprojection error (px)")
    p.add_argument("--max-error", type=float, default=None,
                   help="px radius for snapping reference-side matches to map keypoints (default: the cell size, 4)")
    p.add_argument("--covisibility-clustering", action="store_true",
                   help="PnP per covisibility cluster of the retrieved images; keep the best")
    p.add_argument("--full-names", action="store_true", help="write full query names instead of basenames")
    p.add_argument("--output", type=Path, required=True, help="results file (logs go beside it)")
    cli.add_model_arguments(p)
    cli.add_matcher_arguments(p)
    cli.add_logging_arguments(p)
    return p


def matcher_config(args: argparse.Namespace):
    """The matcher configuration of the command line (``--preset`` maps to the matcher's preset)."""
    from ..matching.matcher import get_config

    return get_config(args.preset, **cli.matcher_overrides(args))


def build_matcher(args: argparse.Namespace) -> Any:
    """Load the network and build the MASt3R matcher of the command line (after input validation)."""
    from ..matching.matcher import Matcher

    model = cli.load_network(args)
    return Matcher(model, matcher_config(args), image_dir=args.images, checkpoint=str(args.checkpoint))


def _load_keypoints(args: argparse.Namespace) -> Dict[str, np.ndarray]:
    """The reference keypoints of ``--database`` or ``--features`` (hloc's convention)."""
    if args.database is not None:
        from ..export.colmap_db import existing_keypoints

        if not args.database.is_file():
            raise ValueError(f"database {str(args.database)!r} does not exist")
        return existing_keypoints(args.database)
    from ..export.hloc_h5 import read_features

    if not args.features.is_file():
        raise ValueError(f"features file {str(args.features)!r} does not exist")
    try:
        return {n: k.keypoints for n, k in read_features(args.features).items()}
    except (OSError, KeyError) as exc:
        raise ValueError(f"cannot read the features file {str(args.features)!r}: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    from ..mapping import load_reference

    if not args.images.is_dir():
        raise ValueError(f"image folder {str(args.images)!r} does not exist or is not a folder")
    if not args.pairs.is_file():
        raise ValueError(f"pairs file {str(args.pairs)!r} does not exist")
    if args.num_loc is not None and args.num_loc < 1:
        raise ValueError(f"--num-loc must be >= 1, got {args.num_loc}")
    if args.output.is_dir():
        raise ValueError(f"output {str(args.output)!r} is a folder, expected a file")
    check_writable(args.output.parent)
    retrieval = read_retrieval(args.pairs, args.num_loc)
    queries = read_queries(args.queries) if args.queries else {q: None for q in retrieval}
    if not queries:
        raise ValueError("no queries")
    without = [q for q in queries if q not in retrieval]
    if len(without) == len(queries):
        raise ValueError(f"none of the {len(queries)} queries has a pair in {str(args.pairs)!r}")
    if without:
        logger.warning("%d queries have no retrieved images and will get the identity pose: %s",
                       len(without), without[:5])
    reference = load_reference(args.reference)
    ref_keypoints = _load_keypoints(args)
    conf = LocalizationConfig(ransac_thresh=args.ransac_thresh, covisibility_clustering=args.covisibility_clustering,
                              keypoints=KeypointConfig(max_kps=None, max_error=args.max_error))
    matcher_config(args)  # a bad preset / batch size fails before loading the network
    matcher = build_matcher(args)
    results = localize(queries, retrieval, reference, ref_keypoints, matcher, image_dir=args.images, conf=conf,
                       progress=not args.no_progress)
    write_results(args.output, results, full_names=args.full_names)
    log_file = write_logs(logs_path(args.output), results)
    ok = sum(r.success for r in results.values())
    print(f"localised {ok} / {len(results)} queries; results: {args.output}; logs: {log_file}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point; bad input gives a message and exit code 2."""
    return cli.main(build_parser(), _run, argv)
