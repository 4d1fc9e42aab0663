"""Command line: MASt3R matching of an image folder into a COLMAP database, then pycolmap mapping.

    python -m mast3r_colmap.run IMAGES DATABASE [options]
    mast3r-colmap IMAGES DATABASE [options]

Argument parsing and wiring only: the work is done by :mod:`mast3r_colmap.pipeline`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from . import cli
from .cli import EXIT_BAD_INPUT, EXIT_NO_MODEL  # noqa: F401 (exit codes re-exported)
from .keypoints import KeypointConfig
from .matching.matcher import confs as matcher_confs
from .pipeline import MAPPERS, PipelineConfig
from .utils import check_writable, missing_folders, remove_empty

logger = logging.getLogger("mast3r_colmap")
_RETRIEVAL_CACHE = 1024  # encodings kept when retrieval pairs are used (see main)


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("mast3r-colmap",
                       "Match images with MASt3R, write a COLMAP database and reconstruct with pycolmap.",
                       no_model=True)
    p.add_argument("images", type=Path, help="image folder (searched recursively)")
    p.add_argument("database", type=Path, help="COLMAP database to create or extend")
    p.add_argument("--pairs", default="exhaustive",
                   help="exhaustive | sequential:W[:loop] | retrieval:K | retrieval:Na,K | an hloc pairs file")
    p.add_argument("--retrieval-model", type=Path, default=None,
                   help="MASt3R-SfM training-free retrieval checkpoint (*_trainingfree.pth, with its "
                        "*_codebook.pkl beside it): retrieval:* pairs then use ASMK similarities instead of "
                        "pooled global descriptors")
    cli.add_model_arguments(p)
    p.add_argument("--preset", choices=sorted(matcher_confs), default="default",
                   help="default: one 512-px pass; hires: coarse-to-fine crops at full resolution; "
                        "sfm: symmetric inference")
    cli.add_matcher_arguments(p)
    p.add_argument("--camera-mode", choices=["auto", "single", "per-folder", "per-image"], default="auto",
                   type=lambda mode: mode.strip().lower().replace("_", "-"),
                   help="auto: images of one size and EXIF focal share a camera (COLMAP's names, e.g. PER_FOLDER, "
                        "work too)")
    p.add_argument("--camera-model", default="SIMPLE_RADIAL", help="COLMAP camera model")
    p.add_argument("--intrinsics", default=None, help="comma-separated camera parameters for every camera")
    p.add_argument("--camera-intrinsics", type=Path, default=None, metavar="FILE",
                   help="per-image cameras, hloc's query-list format 'name MODEL W H params...' per line: the "
                        "images listed get exactly that camera (W H must be the image's size), the others follow "
                        "--camera-mode")
    p.add_argument("--verification-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="pycolmap.TwoViewGeometryOptions of geometric verification, dotted keys of its todict() "
                        "with Python-literal values, e.g. min_num_inliers=30 ransac.max_error=2.0")
    p.add_argument("--cell-size", type=float, default=KeypointConfig.cell_size,
                   help="keypoint consolidation cell (px at full resolution)")
    p.add_argument("--max-kps", type=int, default=KeypointConfig.max_kps, help="keypoints per image (0: no cap)")
    p.add_argument("--export-h5", type=Path, default=None,
                   help="also write hloc features.h5 / matches.h5 / pairs.txt into this folder")
    p.add_argument("--mapper", choices=MAPPERS, default="incremental")
    p.add_argument("--mapper-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="options of the mapper as hloc's --mapper_options: dotted keys of "
                        "pycolmap.IncrementalPipelineOptions().todict() (GlobalPipelineOptions with --mapper "
                        "global) with Python-literal values, e.g. min_num_matches=30 mapper.init_min_num_inliers=50")
    p.add_argument("--output", type=Path, default=None,
                   help="sparse model folder (default: DATABASE's folder/sparse); one holding a model this tool "
                        "did not write is refused, a failed mapping keeps the earlier model and says so in "
                        "summary.json")
    p.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh: delete DATABASE and its match store (with their -wal/-shm files) first; "
                        "without it, a re-run must use the same pictures and matching settings")
    cli.add_logging_arguments(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    return cli.main(build_parser(), _run, argv, "run the same command again to resume")


def _run(args: argparse.Namespace) -> int:
    import pycolmap

    from .lock import database_lock
    from .mapping import check_output, default_output_dir
    from .model.checkpoint import resolve_device

    from .options import parse_option_args
    from .pipeline import mapping_options_class

    # option words fail first, before any file is looked at
    args.verification_options = parse_option_args(args.verification_options, pycolmap.TwoViewGeometryOptions)
    if args.mapper_options and args.mapper == "none":
        logger.warning("--mapper-options are not used with --mapper none")
    args.mapper_options = parse_option_args(args.mapper_options, mapping_options_class(args.mapper))
    if not args.images.is_dir():
        raise ValueError(f"image folder {str(args.images)!r} does not exist or is not a folder")
    if args.database.is_dir():
        raise ValueError(f"database path {str(args.database)!r} is a folder, expected a file")
    for path, what in ((args.database.parent, "folder of the database"), (args.output, "output folder"),
                       (args.export_h5, "hloc export folder")):
        if path is not None:
            check_writable(path, what, create=False)  # created when written: a failed run leaves nothing
    if args.mapper != "none":  # a model of someone else there is never overwritten: fail before matching
        check_output(args.output or default_output_dir(args.database))
    device = resolve_device(args.device)  # e.g. cuda without CUDA: fails before anything is loaded
    created = missing_folders(args.database.parent)
    args.database.parent.mkdir(parents=True, exist_ok=True)
    try:
        with database_lock(args.database):  # a second run on this database stops here, before loading anything
            code = _run_locked(args, device)
    except BaseException:
        remove_empty(created)
        raise
    if code == EXIT_BAD_INPUT:
        remove_empty(created)
    return code


def _run_locked(args: argparse.Namespace, device) -> int:
    from .matching.matcher import Matcher, get_config
    from .pipeline import check_image_names, listed_cameras, reconstruct, usable_images

    config = PipelineConfig(
        pairs=args.pairs, camera_mode=args.camera_mode, camera_model=args.camera_model,
        intrinsics=args.intrinsics, mapper=args.mapper, strict=args.strict, seed=args.seed,
        keypoints=KeypointConfig(cell_size=args.cell_size, max_kps=args.max_kps or None),
        verification_options=args.verification_options,
        mapper_options=args.mapper_options if args.mapper != "none" else None,
        progress=not args.no_progress)
    names = usable_images(args.images, args.strict, not args.no_progress)  # bad input fails before loading
    check_image_names(names, export_h5=args.export_h5 is not None)
    if args.camera_intrinsics is not None:  # a bad file or image size fails before loading
        config.camera_intrinsics = listed_cameras(args.camera_intrinsics, args.images, names)
    overrides = cli.matcher_overrides(args)
    if args.pairs.strip().lower().startswith("retrieval:") and args.cache_size is None:
        # retrieval encodes every image first: keep the encodings so matching does not re-encode them
        # (3 MiB each for ViT-L at 512x384; at most 1024 of them, beyond that the pair schedule keeps
        # re-encoding rare)
        overrides["cache_size"] = max(get_config(args.preset).cache_size, min(len(names), _RETRIEVAL_CACHE))
    matcher_conf = get_config(args.preset, **overrides)
    retriever = None
    if args.retrieval_model is not None:
        if args.pairs.strip().lower().startswith("retrieval:"):
            from .retrieval import load_retriever

            retriever = load_retriever(args.retrieval_model)  # bad files fail before the model is loaded
        else:
            logger.warning("--retrieval-model is only used by retrieval:* pairs, not by %r", args.pairs)
    model = cli.load_network(args, device)
    matcher = Matcher(model, matcher_conf, image_dir=args.images, checkpoint=str(args.checkpoint))
    similarity_fn = None
    if retriever is not None:
        retriever.check_encoder(model.conf.enc_embed_dim)
        similarity_fn = retriever.similarity_fn(matcher)  # encodings shared with matching
    summary = reconstruct(args.images, args.database, matcher, config, output_dir=args.output,
                          export_h5=args.export_h5, descriptors_fn=matcher.global_descriptors, names=names,
                          similarity_fn=similarity_fn, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    if args.mapper != "none" and summary.get("num_registered_images", 0) < 2:
        hint = ("the images may not overlap: try more pairs (--pairs)" if not summary["num_verified_pairs"] else
                "COLMAP's reasons are logged above as mast3r_colmap.colmap (all of them with --verbose)")
        logger.error("no model: the %s mapper registered %d images (at least 2 needed); %d of %d image pairs "
                     "passed geometric verification; %s", args.mapper, summary.get("num_registered_images", 0),
                     summary["num_verified_pairs"], summary["num_pairs"], hint)
        return EXIT_NO_MODEL
    return 0


if __name__ == "__main__":
    sys.exit(main())
