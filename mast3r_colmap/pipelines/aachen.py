"""Aachen Day-Night v1.1 with MASt3R matching (hloc's ``pipelines/Aachen_v1_1`` recipe).

1. db-db pairs: a pairs file, or the top-``num_covis`` covisible images of the SIFT reference model;
2. a database with the reference model's cameras and images (same ids), MASt3R matches of the db-db
   pairs, consolidated keypoints (``max_kps`` per image), verified two-view geometries;
3. 3D points triangulated with the reference poses;
4. the queries (``queries/*_time_queries_with_intrinsics.txt``) localised against that model with their
   top-``num_loc`` retrieved db images (hloc's NetVLAD pairs file), results written as the
   visuallocalization.net submission file ``Aachen-v1.1_mast3r-colmap.txt`` (basenames).

Dataset layout (as hloc expects it)::

    DATASET/images/images_upright/{db,query,sequences}/...
    DATASET/3D-models/aachen_v_1_1/{cameras,images,points3D}.{bin,txt}
    DATASET/queries/{day,night}_time_queries_with_intrinsics.txt

Usage (``python -m pipelines.aachen`` from the repository is the same)::

    python -m mast3r_colmap.pipelines.aachen --dataset datasets/aachen_v1.1 --outputs outputs/aachen_v1.1 \\
        --query-pairs pairs/aachen_v1.1/pairs-query-netvlad50.txt [--preset hires] [--checkpoint ...]

Every stage is resumable: raw matches are kept in SQLite stores under ``--outputs``. Bad input (a missing
dataset file, a missing checkpoint, ...) exits with code 2 before anything is matched
(:func:`mast3r_colmap.cli.run_cli`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import cli
from ..export import colmap_db
from ..keypoints import KeypointConfig
from ..localization import (LocalizationConfig, localize, logs_path, pairs_from_covisibility, read_queries,
                            read_retrieval, triangulate_reference, write_logs, write_results)
from ..mapping import load_reference
from ..pairs import read_pairs, write_pairs
from ..store import MatchStore, config_key

__all__ = ["RESULTS_NAME", "build_parser", "dataset_layout", "main", "run"]

logger = logging.getLogger(__name__)

RESULTS_NAME = "Aachen-v1.1_mast3r-colmap.txt"


def dataset_layout(dataset: str | os.PathLike) -> Dict[str, Any]:
    """The paths of an Aachen v1.1 folder; raises ValueError naming what is missing."""
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise ValueError(f"dataset folder {str(dataset)!r} does not exist")
    images = dataset / "images" / "images_upright"
    reference = dataset / "3D-models" / "aachen_v_1_1"
    queries = sorted((dataset / "queries").glob("*_time_queries_with_intrinsics.txt"))
    if not images.is_dir():
        raise ValueError(f"image folder {str(images)!r} does not exist")
    for stem in ("cameras", "images", "points3D"):
        if not ((reference / f"{stem}.bin").is_file() or (reference / f"{stem}.txt").is_file()):
            raise ValueError(f"reference model {str(reference)!r} has no {stem}.bin or {stem}.txt")
    if not queries:
        raise ValueError(f"no queries/*_time_queries_with_intrinsics.txt in {str(dataset)!r}")
    return {"images": images, "reference": reference, "queries": queries}


def _query_pairs(dataset: Path, outputs: Path, query_pairs: Optional[str | os.PathLike]) -> Path:
    if query_pairs is not None:
        path = Path(query_pairs)
        if not path.is_file():
            raise ValueError(f"query pairs file {str(path)!r} does not exist")
        return path
    for path in (outputs / "pairs-query-netvlad50.txt", dataset / "pairs-query-netvlad50.txt"):
        if path.is_file():
            return path
    raise ValueError("no query pairs: pass --query-pairs (e.g. hloc's pairs/aachen_v1.1/pairs-query-netvlad50.txt)")


def run(dataset: str | os.PathLike, outputs: str | os.PathLike, matcher: Any, *,
        query_matcher: Any = None, query_pairs: Optional[str | os.PathLike] = None,
        db_pairs: Optional[str | os.PathLike] = None, num_covis: int = 20, num_loc: int = 20,
        max_kps: Optional[int] = 8192, cell_size: float = 4.0, ransac_thresh: float = 12.0,
        covisibility_clustering: bool = False, progress: bool = True) -> Path:
    """Run the whole pipeline; returns the path of the submission file.

    ``matcher`` matches the db-db pairs, ``query_matcher`` (default: ``matcher``) the query pairs; both
    are anything with ``match_pairs`` and ``settings`` (e.g. a :class:`~mast3r_colmap.matching.matcher.Matcher`).
    """
    dataset, outputs = Path(dataset), Path(outputs)
    layout = dataset_layout(dataset)
    outputs.mkdir(parents=True, exist_ok=True)
    loc_pairs = _query_pairs(dataset, outputs, query_pairs)
    queries = read_queries(layout["queries"])
    retrieval = read_retrieval(loc_pairs, num_loc)
    logger.info("%d queries, %d with retrieved images (top %d)", len(queries),
                sum(q in retrieval for q in queries), num_loc)
    reference = load_reference(layout["reference"])
    logger.info("reference model: %d images, %d points", reference.num_reg_images(), reference.num_points3D())

    # db-db pairs
    if db_pairs is not None:
        sfm_pairs = read_pairs(db_pairs, dedupe=True)
        pairs_file = Path(db_pairs)
    else:
        pairs_file = outputs / f"pairs-db-covis{num_covis}.txt"
        if pairs_file.is_file():
            sfm_pairs = read_pairs(pairs_file, dedupe=True)
        else:
            sfm_pairs = pairs_from_covisibility(reference, num_covis)
            write_pairs(pairs_file, sfm_pairs)
    logger.info("%d db-db pairs (%s)", len(sfm_pairs), pairs_file)

    # map: match, consolidate, verify, triangulate with the reference poses
    database = outputs / "database.db"
    sfm_dir = outputs / "sfm_mast3r"
    model = triangulate_reference(reference, layout["images"], database, matcher, sfm_pairs, sfm_dir,
                                  keypoints=KeypointConfig(cell_size=cell_size, max_kps=max_kps),
                                  progress=progress)
    logger.info("triangulated model: %d points in %d images", model.num_points3D(), model.num_reg_images())

    # localisation
    ref_keypoints = colmap_db.existing_keypoints(database)
    query_matcher = query_matcher if query_matcher is not None else matcher
    conf = LocalizationConfig(ransac_thresh=ransac_thresh, covisibility_clustering=covisibility_clustering,
                              keypoints=KeypointConfig(cell_size=cell_size, max_kps=None))
    with MatchStore(outputs / "query-matches.sqlite", config_key(query_matcher.settings()),
                    image_dir=layout["images"]) as store:  # query matches reused only for unchanged files
        results = localize(queries, retrieval, model, ref_keypoints, query_matcher, image_dir=layout["images"],
                           conf=conf, store=store, progress=progress)
    path = write_results(outputs / RESULTS_NAME, results)
    write_logs(logs_path(path), results)
    logger.info("localised %d / %d queries; submission file %s", sum(r.success for r in results.values()),
                len(results), path)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m mast3r_colmap.pipelines.aachen", __doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, required=True, help="Aachen v1.1 root")
    p.add_argument("--outputs", type=Path, required=True, help="output folder")
    p.add_argument("--query-pairs", type=Path, default=None,
                   help="query pairs file (default: pairs-query-netvlad50.txt in --outputs or --dataset)")
    p.add_argument("--db-pairs", type=Path, default=None, help="db-db pairs file (default: covisibility)")
    p.add_argument("--preset", choices=["default", "hires"], default="default",
                   help="query matching preset (hires: coarse-to-fine, as MASt3R's visloc)")
    p.add_argument("--mapping-preset", choices=["default", "hires"], default="default",
                   help="db-db matching preset")
    p.add_argument("--num-covis", type=int, default=20)
    p.add_argument("--num-loc", type=int, default=20)
    p.add_argument("--max-kps", type=int, default=8192, help="keypoints per db image (0: no cap)")
    p.add_argument("--ransac-thresh", type=float, default=LocalizationConfig.ransac_thresh)
    p.add_argument("--covisibility-clustering", action="store_true")
    cli.add_model_arguments(p)
    cli.add_matcher_arguments(p)
    cli.add_logging_arguments(p)
    return p


def _run(args: argparse.Namespace) -> int:
    from ..matching.matcher import Matcher, get_config

    if args.num_covis < 1 or args.num_loc < 1 or args.max_kps < 0:
        raise ValueError("--num-covis and --num-loc must be >= 1, --max-kps >= 0")
    layout = dataset_layout(args.dataset)                     # bad input fails before loading the model
    _query_pairs(args.dataset, args.outputs, args.query_pairs)
    if args.db_pairs is not None and not args.db_pairs.is_file():
        raise ValueError(f"db pairs file {str(args.db_pairs)!r} does not exist")
    mapping_conf = get_config(args.mapping_preset, **cli.matcher_overrides(args))
    query_conf = get_config(args.preset, **cli.matcher_overrides(args))
    model = cli.load_network(args)
    matcher = Matcher(model, mapping_conf, image_dir=layout["images"], checkpoint=str(args.checkpoint))
    query_matcher = (matcher if args.preset == args.mapping_preset else
                     Matcher(model, query_conf, image_dir=layout["images"], checkpoint=str(args.checkpoint)))
    path = run(args.dataset, args.outputs, matcher, query_matcher=query_matcher, query_pairs=args.query_pairs,
               db_pairs=args.db_pairs, num_covis=args.num_covis, num_loc=args.num_loc,
               max_kps=args.max_kps or None, ransac_thresh=args.ransac_thresh,
               covisibility_clustering=args.covisibility_clustering, progress=not args.no_progress)
    print(f"submission file: {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point; bad input gives a message and exit code 2."""
    return cli.main(build_parser(), _run, argv, "run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
