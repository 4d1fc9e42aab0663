"""Command line: MASt3R matching of an image folder into a COLMAP database, then pycolmap mapping.

    python -m mast3r_colmap.run IMAGES DATABASE [options]
    mast3r-colmap IMAGES DATABASE [options]

Argument parsing and wiring only: the work is done by :mod:`mast3r_colmap.pipeline`.

Every run that got past the checks of its input writes a run report (:mod:`mast3r_colmap.report`):
``report.json`` in the model folder (``--output``, default DATABASE's folder/sparse), or, with
``--mapper none``, ``DATABASE.report.json`` beside the database (as its match store,
``DATABASE.mast3r-matches.sqlite``). A run that fails writes it too, with ``"status": "failed"`` and the
error, unless it was refused for bad input before the database was written.

Many GPUs (:mod:`mast3r_colmap.executors`): ``--shard I/N`` matches one shard into its own store beside the
database and prints what it did as JSON (no database, no report); the same command without ``--shard`` merges.
Under torchrun every rank matches its shard and rank 0 runs the whole pipeline; ``--executor ray`` has a Ray
cluster match the shards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

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
    p.add_argument("--no-focal-prior", dest="focal_prior", action="store_false",
                   help="new cameras without an EXIF focal or given intrinsics start from COLMAP's 1.2 * max(W, H) "
                        "guess instead of the focal MASt3R's pointmaps give (the median over their images)")
    p.add_argument("--verification-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="pycolmap.TwoViewGeometryOptions of geometric verification, dotted keys of its todict() "
                        "with Python-literal values, e.g. min_num_inliers=30 ransac.max_error=2.0")
    p.add_argument("--cell-size", type=float, default=KeypointConfig.cell_size,
                   help="px at full resolution: the radius within which --max-kps re-assigns the matches of dropped "
                        "keypoints and new matches snap to the keypoints of images already in DATABASE, and the "
                        "cell of matches without a sampling grid (MASt3R's matches get one keypoint per network "
                        "pixel, or per full-resolution pixel with --preset hires)")
    p.add_argument("--max-kps", type=int, default=KeypointConfig.max_kps,
                   help="keypoints per image: the most-voted are kept, the matches of the others re-assigned "
                        "within --cell-size (default, or 0: no cap, the most accurate; 8192 maps ~4x faster at "
                        "1600 px, with ~2x the pose error: benchmarks/bench_sfm_accuracy.py)")
    p.add_argument("--export-h5", type=Path, default=None,
                   help="also write hloc features.h5 / matches.h5 / pairs.txt into this folder")
    p.add_argument("--export-3dgs", type=Path, default=None, metavar="DIR",
                   help="after mapping, also write the model undistorted for Gaussian Splatting trainers: "
                        "DIR/images/ + DIR/sparse/0/ with PINHOLE cameras (an earlier export there is replaced, "
                        "a folder of someone else is refused)")
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
    p.add_argument("--plots", action="store_true",
                   help="also draw pictures (python -m mast3r_colmap.visualize): the pairs with the most and the "
                        "fewest verified inliers and the model, into the model folder's plots/ (DATABASE.plots/ "
                        "with --mapper none)")
    _add_shard_arguments(p)
    cli.add_logging_arguments(p)
    return p


def _add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    """``--shard``, ``--executor``, ``--ray-address``, ``--gpus-per-shard``, ``--num-shards`` (see
    :mod:`mast3r_colmap.executors`; under torchrun every rank matches a shard and rank 0 merges)."""
    from .executors import EXECUTORS

    group = parser.add_argument_group(
        "many GPUs", "matching cut into shards, each matched by its own worker into its own store beside DATABASE, "
                     "then merged; under torchrun (RANK/WORLD_SIZE set) rank r matches shard r of WORLD_SIZE and "
                     "rank 0 merges once all are done")
    group.add_argument("--shard", default=None, metavar="I/N",
                       help="match only shard I (from 0) of N into its store DATABASE.mast3r-matches.shard-I-of-N"
                            ".sqlite, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; the database is not "
                            "touched. The same command without --shard then matches whatever no shard store holds "
                            "and merges them all into DATABASE (--overwrite with --shard: that shard starts afresh)")
    group.add_argument("--executor", choices=EXECUTORS, default="local",
                       help="local: this process; ray: one Ray task per shard (pip install \"mast3r-colmap[ray]\"; "
                            "workers see the images and DATABASE's folder at the same paths), then the merge here")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="the Ray cluster to use (default: RAY_ADDRESS, else a new cluster of this machine)")
    group.add_argument("--gpus-per-shard", type=float, default=1.0, metavar="G",
                       help="GPUs of one Ray shard task (0: match on CPUs)")
    group.add_argument("--num-shards", type=int, default=None, metavar="N",
                       help="shards of --executor ray (default: the cluster's GPUs / --gpus-per-shard)")


def main(argv: Optional[List[str]] = None) -> int:
    command = list(sys.argv) if argv is None else ["mast3r-colmap", *(str(a) for a in argv)]
    return cli.main(build_parser(), lambda args: _run(args, command), argv, "run the same command again to resume")


def report_path(database: Path, mapper: str, output: Optional[Path] = None) -> Path:
    """Where a run's report goes: ``report.json`` in the model folder, or ``DATABASE.report.json``
    beside the database with ``--mapper none``."""
    from .mapping import default_output_dir
    from .report import REPORT_FILE, report_beside_database

    if mapper == "none":
        return report_beside_database(database)
    return Path(output or default_output_dir(database)) / REPORT_FILE


def _write_report(report, args: argparse.Namespace) -> None:
    """Finish and write the run report; a report that cannot be written is logged, never raised (it must
    not hide the run's own error)."""
    report.finish()
    path = report_path(args.database, args.mapper, args.output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        report.write(path)
    except OSError as exc:
        logger.error("could not write the run report %s: %s", path, exc)
        return
    logger.info("run report (%s): %s", report.status, path)


def _run(args: argparse.Namespace, command: Optional[Sequence[str]] = None) -> int:
    import pycolmap

    from .lock import database_lock
    from .mapping import check_output, default_output_dir
    from .model.checkpoint import resolve_device
    from .report import RunReport

    from .options import parse_option_args
    from .pipeline import mapping_options_class

    report = RunReport(command)  # written once the run is past the checks of its input (see _write_report)
    # option words fail first, before any file is looked at
    args.verification_options = parse_option_args(args.verification_options, pycolmap.TwoViewGeometryOptions)
    if args.mapper_options and args.mapper == "none":
        logger.warning("--mapper-options are not used with --mapper none")
    args.mapper_options = parse_option_args(args.mapper_options, mapping_options_class(args.mapper))
    torchrun = _check_shard_flags(args)
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
    if args.export_3dgs is not None:  # no model to export, or a folder we must not replace: fail before matching
        from .export_3dgs import check_output as check_3dgs_output

        if args.mapper == "none":
            raise ValueError("--export-3dgs needs a model: not with --mapper none")
        check_3dgs_output(args.export_3dgs, overwrite=True, image_dir=args.images,
                          model_dir=args.output or default_output_dir(args.database))
    device = resolve_device(args.device)  # e.g. cuda without CUDA: fails before anything is loaded
    if torchrun is not None:
        from .executors import rank_device

        device = rank_device(device, torchrun[2])  # cuda -> cuda:LOCAL_RANK
    if args.shard is not None or (torchrun is not None and torchrun[0] != 0):
        return _run_shard_worker(args, device, torchrun)  # its shard store only: no database, no database lock
    created = missing_folders(args.database.parent)
    args.database.parent.mkdir(parents=True, exist_ok=True)
    try:
        with database_lock(args.database):  # a second run on this database stops here, before loading anything
            try:
                code = _run_locked(args, device, report)
            except BaseException as exc:
                report.fail(exc)
                if report.entered("database_write") or not isinstance(exc, (ValueError, OSError)):
                    _write_report(report, args)  # bad input refused before the database was written: no report
                raise
            if code != EXIT_BAD_INPUT or report.entered("database_write"):
                _write_report(report, args)
    except BaseException:
        remove_empty(created)
        raise
    if code == EXIT_BAD_INPUT:
        remove_empty(created)
    return code


def _run_locked(args: argparse.Namespace, device, report) -> int:
    from .matching.matcher import Matcher
    from .pipeline import check_image_names, listed_cameras, reconstruct, usable_images

    config = PipelineConfig(
        pairs=args.pairs, camera_mode=args.camera_mode, camera_model=args.camera_model,
        intrinsics=args.intrinsics, mapper=args.mapper, strict=args.strict, seed=args.seed,
        keypoints=KeypointConfig(cell_size=args.cell_size, max_kps=args.max_kps or None),
        verification_options=args.verification_options,
        mapper_options=args.mapper_options if args.mapper != "none" else None,
        progress=not args.no_progress, focal_prior=args.focal_prior)
    with report.stage("image_check"):
        names = usable_images(args.images, args.strict, not args.no_progress)  # bad input fails before loading
        check_image_names(names, export_h5=args.export_h5 is not None)
        if args.camera_intrinsics is not None:  # a bad file or image size fails before loading
            config.camera_intrinsics = listed_cameras(args.camera_intrinsics, args.images, names)
    matcher_conf = _matcher_conf(args, len(names))
    retriever = None
    if args.retrieval_model is not None:
        if args.pairs.strip().lower().startswith("retrieval:"):
            from .retrieval import load_retriever

            retriever = load_retriever(args.retrieval_model)  # bad files fail before the model is loaded
        else:
            logger.warning("--retrieval-model is only used by retrieval:* pairs, not by %r", args.pairs)
    with report.stage("model_load"):
        model = cli.load_network(args, device)
    matcher = Matcher(model, matcher_conf, image_dir=args.images, checkpoint=str(args.checkpoint))
    report.update_settings(checkpoint=str(args.checkpoint), preset=args.preset, device=str(device),
                           precision=args.precision, matcher_config=matcher_conf, arguments=dict(vars(args)))
    similarity_fn = None
    if retriever is not None:
        retriever.check_encoder(model.conf.enc_embed_dim)
        similarity_fn = retriever.similarity_fn(matcher)  # encodings shared with matching
    with _sharding(args, matcher) as match_shards:  # None for a run of this process alone
        summary = reconstruct(args.images, args.database, matcher, config, output_dir=args.output,
                              export_h5=args.export_h5, descriptors_fn=matcher.global_descriptors, names=names,
                              similarity_fn=similarity_fn, overwrite=args.overwrite, report=report,
                              export_3dgs=args.export_3dgs, match_shards=match_shards)
    if getattr(match_shards, "results", None):
        summary["shards"] = [result.as_dict() for result in match_shards.results]
    print(json.dumps(summary, indent=2))
    if args.plots:
        _write_plots(args, summary)
    if args.mapper != "none" and summary.get("num_registered_images", 0) < 2:
        hint = ("the images may not overlap: try more pairs (--pairs)" if not summary["num_verified_pairs"] else
                "COLMAP's reasons are logged above as mast3r_colmap.colmap (all of them with --verbose)")
        logger.error("no model: the %s mapper registered %d images (at least 2 needed); %d of %d image pairs "
                     "passed geometric verification; %s", args.mapper, summary.get("num_registered_images", 0),
                     summary["num_verified_pairs"], summary["num_pairs"], hint)
        return EXIT_NO_MODEL
    return 0


def _write_plots(args: argparse.Namespace, summary: dict) -> None:
    """``--plots``: :func:`~.visualize.write_overview` into the model folder's ``plots/`` (``DATABASE.plots/``
    with ``--mapper none``); pictures that cannot be drawn are logged, the run's result stands."""
    from .mapping import default_output_dir
    from .visualize import write_overview

    folder = (Path(args.output or default_output_dir(args.database)) / "plots" if args.mapper != "none"
              else args.database.with_name(args.database.name + ".plots"))
    try:
        write_overview(args.database, args.images, summary.get("model"), folder)
    except (ValueError, OSError) as exc:
        logger.error("could not draw the pictures in %s: %s", folder, exc)


# ---- shards (see mast3r_colmap.executors) ----------------------------------------------------------


def _matcher_conf(args: argparse.Namespace, num_images: Optional[int] = None):
    """The :class:`~.matching.matcher.MatcherConfig` of the flags."""
    from .matching.matcher import get_config

    overrides = cli.matcher_overrides(args)
    if args.pairs.strip().lower().startswith("retrieval:") and args.cache_size is None and num_images:
        # retrieval encodes every image first: keep the encodings so matching does not re-encode them
        # (3 MiB each for ViT-L at 512x384; at most 1024 of them, beyond that the pair schedule keeps
        # re-encoding rare)
        overrides["cache_size"] = max(get_config(args.preset).cache_size, min(num_images, _RETRIEVAL_CACHE))
    return get_config(args.preset, **overrides)


def _check_shard_flags(args: argparse.Namespace):
    """The flags of :func:`_add_shard_arguments` that cannot go together fail here; returns
    :func:`~.executors.torchrun_env` (None outside torchrun)."""
    from .executors import torchrun_env
    from .shards import parse_shard

    torchrun = torchrun_env()
    if args.shard is not None:
        parse_shard(args.shard)
        if args.executor != "local":
            raise ValueError("--shard matches one shard in this process: not with --executor ray (which runs every "
                             "shard itself)")
        if torchrun is not None:
            raise ValueError("--shard under torchrun: each rank matches its shard already (RANK/WORLD_SIZE); "
                             "use one or the other")
    if torchrun is not None and args.executor != "local":
        raise ValueError("--executor ray under torchrun: torchrun's ranks match the shards already; use one or the "
                         "other")
    if args.num_shards is not None and args.num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {args.num_shards}")
    if args.gpus_per_shard < 0:
        raise ValueError(f"--gpus-per-shard must be >= 0, got {args.gpus_per_shard:g}")
    if args.executor != "ray" and (args.ray_address or args.num_shards is not None):
        logger.warning("--ray-address and --num-shards are only used with --executor ray")
    return torchrun


class _LoadMatcher:
    """The command line's matcher factory (see :mod:`~.executors`): loads ``--checkpoint`` where it is called
    (a Ray worker: on the GPU Ray gave the task) and returns the matcher of the flags. Picklable."""

    def __init__(self, args: argparse.Namespace, conf, device=None):
        self.model_args = argparse.Namespace(checkpoint=args.checkpoint, precision=args.precision,
                                             device=None if device is None else str(device))
        self.conf, self.images = conf, args.images
        self._matcher = None

    def __call__(self):
        from .matching.matcher import Matcher

        if self._matcher is None:  # once per process: a shard's retrieval and matching share it
            model = cli.load_network(self.model_args)
            self._matcher = Matcher(model, self.conf, image_dir=self.images,
                                    checkpoint=str(self.model_args.checkpoint))
        return self._matcher

    def __getstate__(self):
        return {**self.__dict__, "_matcher": None}  # the recipe travels, never a loaded network


@contextlib.contextmanager
def _sharding(args: argparse.Namespace, matcher):
    """The ``match_shards`` hook of :func:`~.pipeline.reconstruct` for the flags: rank 0's under torchrun,
    Ray's with ``--executor ray``, else None (this process matches everything)."""
    from .executors import ShardedMatching, TorchrunMatching, process_group, torchrun_env

    torchrun = torchrun_env()
    if torchrun is not None:  # rank 0: the others wait in _run_shard_worker
        hook = TorchrunMatching(lambda: matcher, torchrun[0], torchrun[1], matcher.cache_size,
                                progress=not args.no_progress)
        with process_group():
            try:
                yield hook
            finally:
                hook.close()
    elif args.executor == "ray":
        yield ShardedMatching(_LoadMatcher(args, matcher.conf, args.device), args.num_shards, "ray",
                              matcher.cache_size, progress=not args.no_progress, ray_address=args.ray_address,
                              gpus_per_shard=args.gpus_per_shard)
    else:
        yield None


def _run_shard_worker(args: argparse.Namespace, device, torchrun) -> int:
    """A shard worker: ``--shard I/N`` (matches shard I of the pairs of the flags), or a torchrun rank other
    than 0 (matches its shard of the pairs rank 0 hands out). Writes the shard's store only; prints what it
    did as JSON."""
    from .executors import TorchrunMatching, match_shard, process_group
    from .pipeline import check_image_names, default_store_path, usable_images
    from .shards import parse_shard, partition_pairs, shard_report

    if torchrun is not None:
        factory = _LoadMatcher(args, _matcher_conf(args), device)
        with process_group():
            result = TorchrunMatching(factory, torchrun[0], torchrun[1], progress=False).follow()
        print(json.dumps(result.as_dict() if result is not None else {}, indent=2))
        return 0
    from .pairs import pairs_from_spec

    index, count = parse_shard(args.shard)
    names = usable_images(args.images, args.strict, not args.no_progress)
    check_image_names(names)
    factory = _LoadMatcher(args, _matcher_conf(args, len(names)), device)
    similarity_fn = None
    if args.retrieval_model is not None and args.pairs.strip().lower().startswith("retrieval:"):
        from .retrieval import load_retriever

        retriever = load_retriever(args.retrieval_model)
        similarity_fn = lambda names: retriever.similarity_fn(factory())(names)  # noqa: E731
    pairs = pairs_from_spec(args.pairs, names, descriptors_fn=lambda names: factory().global_descriptors(names),
                            seed=args.seed, similarity_fn=similarity_fn)
    cache_size = factory.conf.cache_size
    shards = partition_pairs(pairs, count, cache_size)
    shard_report(shards, cache_size)
    args.database.parent.mkdir(parents=True, exist_ok=True)
    result = match_shard(shards[index], factory, default_store_path(args.database), args.images,
                         progress=not args.no_progress, fresh=args.overwrite)
    print(json.dumps(result.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
