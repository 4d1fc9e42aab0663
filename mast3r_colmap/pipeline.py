"""From an image folder to a COLMAP database and model: the stages wired together.

    images -> pairs -> matching (resumable store) -> keypoint consolidation -> COLMAP database
           -> geometric verification -> [hloc h5 export] -> mapping -> summary

Stages communicate through the plain values of :mod:`mast3r_colmap.structures`. The matcher is anything
with ``match_pairs(pairs) -> Iterator[PairMatches]``: in practice the :class:`~.matching.matcher.Matcher`,
over the MASt3R network or, in the tests, over the synthetic-scene oracle
(:class:`~.testing.synthetic.SyntheticNetwork`) plugged in at the same seam.

Crash safety: raw matches go pair by pair into a :class:`~.store.MatchStore`; keypoints and matches
are written to the database in one transaction after all pairs are matched; verification and mapping
are idempotent. A run killed at any point and started again ends with the same database.

Cameras: a new camera without an EXIF focal or the user's intrinsics starts from the network's focal
estimate (:func:`estimate_focal_priors`, before the images are imported; :func:`apply_focal_priors` right
after, on the cameras this run created), recorded in the database (:mod:`~.export.focal_priors`); cameras
of earlier runs never change.

Re-runs never mix inputs: stored matches are reused only for unchanged image files and weights (see
:mod:`~.store`), and a database records the pictures and settings that filled it
(:mod:`~.export.provenance`): a re-run with a changed picture or other settings is refused before any
matching, unless ``overwrite`` starts the database and the match store afresh.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections import ChainMap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import pycolmap
from tqdm import tqdm

from . import export_3dgs as gs_export
from . import mapping
from .cameras import DEFAULT_FOCAL_LENGTH_FACTOR, normalise_camera_mode, read_camera_list, read_image_info
from .export import colmap_db, focal_priors, hloc_h5, provenance, scores
from .images import ImageLoadError, list_images, validate_image
from .keypoints import KeypointConfig, consolidate_out_of_core
from .lock import locks_database
from .matching.schedule import schedule_pairs
from .options import build as build_options
from .pairs import pairs_from_spec, write_pairs
from .report import RunReport
from .shards import StoreChain, open_shard_stores, remove_shard_stores
from .store import MatchStore, config_key
from .structures import ImageKeypoints, IndexMatches, PairMatches
from .verification import verification_options, verify_matches

logger = logging.getLogger(__name__)

MAPPERS = ("incremental", "global", "none")


class PairMatcher(Protocol):
    """What the pipeline needs from a matcher: the :class:`~.matching.matcher.Matcher` over any dense
    network (MASt3R, or the synthetic oracle of the tests), or a test stand-in.

    A matcher that caches per-image work may also have a ``cache_size`` attribute (images it keeps):
    the pipeline then matches the pairs in the order of :func:`~.matching.schedule.schedule_pairs`.
    """

    def settings(self) -> Dict[str, Any]:
        """Everything that determines the matches (keys the resumable store; recorded in the database)."""
        ...

    def match_pairs(self, pairs: Iterable[Tuple[str, str]]) -> Iterator[PairMatches]:
        ...


@dataclass
class PipelineConfig:
    """Settings of :func:`reconstruct` (the CLI maps its flags onto these)."""

    pairs: str = "exhaustive"
    #: "auto", "single", "per-folder", "per-image" or a ``pycolmap.CameraMode``
    camera_mode: str | pycolmap.CameraMode = "auto"
    camera_model: str = "SIMPLE_RADIAL"
    intrinsics: Optional[str] = None
    #: ``pycolmap.ImageReaderOptions`` or its dict (camera_model, camera_params, default_focal_length_factor,
    #: existing_camera_id), as hloc's ``image_options``; see :func:`~.export.colmap_db.import_images`
    image_options: Any = None
    #: ``{name: pycolmap.Camera}`` or an hloc list file (``name MODEL W H params...`` per line): these
    #: images get exactly that camera, the others follow ``camera_mode``
    camera_intrinsics: Any = None
    keypoints: KeypointConfig = field(default_factory=KeypointConfig)
    #: ``pycolmap.TwoViewGeometryOptions`` or a dict over :data:`~.verification.DEFAULT_VERIFICATION_OPTIONS`
    verification_options: Any = None
    mapper: str = "incremental"
    #: ``pycolmap.IncrementalPipelineOptions`` / ``GlobalPipelineOptions`` (by ``mapper``) or a nested dict
    mapper_options: Any = None
    strict: bool = False
    seed: int = 0
    progress: bool = True
    #: new cameras without an EXIF focal or the user's intrinsics start from the network's focal estimate
    #: (the median over their images) instead of COLMAP's ``1.2 * max(W, H)``: see :func:`estimate_focal_priors`
    focal_prior: bool = True

    def __post_init__(self) -> None:
        if self.mapper not in MAPPERS:
            raise ValueError(f"unknown mapper {self.mapper!r}: choose from {', '.join(MAPPERS)}")
        normalise_camera_mode(self.camera_mode)
        verification_options(self.verification_options)  # bad options fail here, before any matching
        if self.mapper != "none":
            build_options(mapping_options_class(self.mapper), self.mapper_options)


def mapping_options_class(mapper: str) -> type:
    """The pycolmap options class of a mapper: ``IncrementalPipelineOptions`` or ``GlobalPipelineOptions``."""
    return pycolmap.GlobalPipelineOptions if mapper == "global" else pycolmap.IncrementalPipelineOptions


def default_store_path(database: str | os.PathLike) -> Path:
    """Where the raw matches of a run are kept: beside the database."""
    database = Path(database)
    return database.with_name(database.name + ".mast3r-matches.sqlite")


def remove_run_files(database: str | os.PathLike, store_path: Optional[str | os.PathLike] = None) -> List[Path]:
    """Delete a run's database and match store (default :func:`default_store_path`) and the shard stores
    beside it (:mod:`~.shards`) with their SQLite ``-wal`` / ``-shm`` companions, and nothing else; returns
    the files deleted. A shard store still being matched raises ValueError (see :mod:`~.shards`)."""
    store_path = Path(store_path) if store_path else default_store_path(database)
    removed = remove_shard_stores(store_path)
    for path in (Path(database), store_path):
        for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if file.is_file():
                file.unlink()
                removed.append(file)
    if removed:
        logger.info("overwrite: deleted %s", ", ".join(str(f) for f in removed))
    return removed


def usable_images(image_dir: str | os.PathLike, strict: bool = False, progress: bool = True) -> List[str]:
    """Image names under ``image_dir`` that decode; unreadable ones are skipped with a warning
    (or raise :class:`ImageLoadError` when ``strict``)."""
    names = list_images(image_dir)
    if not names:
        raise ValueError(f"no images found in {os.fspath(image_dir)!r} "
                         "(looked for .jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp, recursively)")
    good = []
    for name in tqdm(names, desc="checking images", unit="img", disable=not progress):
        try:
            validate_image(Path(image_dir) / name)
        except ImageLoadError as exc:
            if strict:
                raise
            logger.warning("skipping %s", exc)
            continue
        good.append(name)
    if len(good) < 2:
        raise ValueError(f"need at least 2 readable images in {os.fspath(image_dir)!r}, found {len(good)}")
    return good


def check_image_names(names: Iterable[str], export_h5: bool = False) -> None:
    """Refuse, before any matching, the image names a run cannot carry through, saying why.

    * A name that is not valid UTF-8 (file-name bytes that Python could only decode with surrogate
      escapes): COLMAP stores names as UTF-8 text and pycolmap cannot take it.
    * With ``export_h5``: a name with whitespace, since hloc's pairs.txt is whitespace separated; and
      two names that hloc's matches.h5 keys (``/`` replaced by ``-``) cannot tell apart.

    Everything else works: spaces, unicode, subfolders, even line breaks (the database and the binary
    model hold names as length-delimited text; only COLMAP's *text* model format cuts names at whitespace).

    Raises:
        ValueError: naming (up to 5 of) the refused names and the reason.
    """
    names = list(names)

    def refuse(bad: Sequence[object], reason: str) -> None:
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise ValueError(f"{len(bad)} image name(s) {reason}: "
                             f"{', '.join(repr(n) for n in bad[:5])}{more}; rename the files")

    bad = []
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(os.fsencode(name))
    refuse(bad, "are not valid UTF-8, which COLMAP needs for image names")
    if export_h5:
        refuse([n for n in names if any(c.isspace() for c in n)],
               "contain whitespace and cannot go into the hloc pairs.txt of --export-h5")
        keys: Dict[str, str] = {}
        for name in names:
            other = keys.setdefault(name.replace("/", "-"), name)
            if other != name:
                refuse([other, name], "have the same hloc matches.h5 key ('/' replaced by '-') and "
                                      "cannot both go into the files of --export-h5")


def listed_cameras(camera_intrinsics: Any, image_dir: str | os.PathLike,
                   names: Sequence[str]) -> Dict[str, pycolmap.Camera]:
    """The cameras of :attr:`PipelineConfig.camera_intrinsics` (``{name: Camera}`` or an hloc list file)
    for the images of ``names``, each checked against the image's size (after EXIF orientation).

    Raises:
        ValueError: a bad file (see :func:`~.cameras.read_camera_list`) or a camera of another size.
    """
    if camera_intrinsics is None:
        return {}
    if not isinstance(camera_intrinsics, Mapping):
        camera_intrinsics = read_camera_list(camera_intrinsics, what="camera intrinsics file", require_camera=True)
    cameras = {str(n): c for n, c in camera_intrinsics.items() if c is not None}
    unknown = sorted(set(cameras) - set(names))
    if unknown:
        logger.warning("camera intrinsics of %d image(s) not in this run, ignored: %s", len(unknown),
                       ", ".join(unknown[:5]))
    out = {}
    for name in names:
        if name in cameras:
            cam, info = cameras[name], read_image_info(Path(image_dir) / name)
            if (cam.width, cam.height) != (info.width, info.height):
                raise ValueError(f"camera intrinsics of {name!r} are for {cam.width}x{cam.height}, but the image "
                                 f"is {info.width}x{info.height}")
            out[name] = cam
    if out:
        logger.info("%d image(s) get the cameras of the intrinsics list", len(out))
    return out


def match_into_store(matcher: PairMatcher, pairs: Sequence[Tuple[str, str]], store: MatchStore,
                     progress: bool = True, on_pair: Optional[Callable[[PairMatches], Any]] = None) -> int:
    """Match the pairs the store does not hold yet, committing each as it finishes (then ``on_pair(matches)``,
    e.g. a shard's progress report); returns how many were matched.

    With a matcher that has a ``cache_size``, the pairs are matched in a cache-friendly order
    (:func:`~.matching.schedule.schedule_pairs`); the store does not depend on the order.
    """
    done = store.done_pairs()
    todo = [p for p in pairs if frozenset(p) not in done]
    logger.info("matching: %d pairs to do, %d already in the store", len(todo), len(pairs) - len(todo))
    cache_size = getattr(matcher, "cache_size", None)
    if cache_size:
        todo = schedule_pairs(todo, cache_size)
    bar = tqdm(total=len(todo), desc="matching", unit="pair", disable=not progress)
    for pm in matcher.match_pairs(todo):
        store.put(pm)
        if on_pair is not None:
            on_pair(pm)
        bar.update()
        bar.set_postfix(matches=len(pm))
    bar.close()
    encodings = getattr(matcher, "encodings", None)
    if todo and encodings is not None:
        images = len({name for pair in todo for name in pair})
        logger.info("matching: %d pairs over %d images, %d encoder runs", len(todo), images, encodings.misses)
    return len(todo)


def database_settings(matcher: PairMatcher, keypoint_conf: KeypointConfig) -> Dict[str, Any]:
    """What must stay the same across the runs that fill one database (it records them): the matcher's
    settings and the keypoint settings. Not the pairs: adding pairs or images is a normal re-run."""
    return {"matcher": matcher.settings(), "keypoints": dataclasses.asdict(keypoint_conf)}


def _image_hashes(store: MatchStore, names: Iterable[str]) -> Dict[str, str]:
    """Content hashes of the image files (none when the store has no image folder); a file that cannot
    be read is left out (the matcher reports it if it is paired)."""
    out = {}
    for name in names:
        try:
            digest = store.file_hash(name)
        except OSError as exc:
            logger.debug("cannot hash image %s: %s", name, exc)
            continue
        if digest is not None:
            out[name] = digest
    return out


def match_into_database(database: str | os.PathLike, ids: Mapping[str, int], pairs: Sequence[Tuple[str, str]],
                        matcher: PairMatcher, keypoint_conf: KeypointConfig = KeypointConfig(),
                        store_path: Optional[str | os.PathLike] = None, progress: bool = True,
                        image_dir: Optional[str | os.PathLike] = None, verification_options: Any = None,
                        report: Optional[RunReport] = None, match_shards: Optional[Callable[..., Any]] = None):
    """Match the pairs the database lacks (through the resumable store), consolidate keypoints (images
    that already have keypoints keep them), write keypoints and matches in one transaction, verify.

    The matches are read from the run's store and every shard store beside it (:mod:`~.shards`, read-only);
    only the pairs that no store holds are matched, into the run's store. A sharded run passes
    ``match_shards`` (see :mod:`~.executors`): it is called as ``match_shards(pairs, store_path=...,
    image_dir=...)`` with the pairs that the database lacks and no store holds, and has the shards match
    them into their stores; then the stores are read. Without shards (and without shard stores) this is a run of one store.

    First the image files (under ``image_dir``, default ``matcher.image_dir``; without one, only the
    settings) and :func:`database_settings` are checked against what the database records, and recorded:
    a changed picture or other settings raise a ValueError before any matching.

    ``verification_options`` (``pycolmap.TwoViewGeometryOptions`` or a dict) go to
    :func:`~.verification.verify_matches`; pairs verified by an earlier run keep their two-view geometry.

    Consolidation runs out of core (:func:`~.keypoints.consolidate_out_of_core`: memory bounded by the
    observations of the largest image, scratch files in :func:`consolidation_scratch`), and the database write
    reads its keypoints and matches back one at a time, in the one transaction.

    Returns ``{pair: number of inliers}`` of the verification of ``pairs``.

    ``report`` (a :class:`~.report.RunReport`) gets the stages matching, consolidation, database_write
    and verification, their counts and histograms (see :func:`_report_matching`).
    """
    report = report if report is not None else RunReport()
    image_dir = image_dir if image_dir is not None else getattr(matcher, "image_dir", None)
    settings = database_settings(matcher, keypoint_conf)
    store_path = Path(store_path) if store_path else default_store_path(database)
    with MatchStore(store_path, config_key(settings["matcher"]), image_dir) as store:
        hashes = _image_hashes(store, ids)
        provenance.check(database, hashes, settings)
        provenance.record(database, hashes, settings)
        with colmap_db.open_database(database) as db:
            in_db = colmap_db.existing_pairs(db)
            new_pairs = [tuple(p) for p in pairs if frozenset(p) not in in_db]
            with_keypoints = colmap_db.images_with_keypoints(db)
            fixed = colmap_db.existing_keypoints(db, {n for p in new_pairs for n in p} & with_keypoints)
        if len(new_pairs) < len(pairs):
            logger.info("%d pairs already matched in the database, skipped", len(pairs) - len(new_pairs))
        shard_results: Sequence[Any] = ()
        if match_shards is not None:  # a sharded run: the shards match what no store holds into their own stores
            with open_shard_stores(store_path, store.config, image_dir) as shard_stores:
                held = StoreChain([store, *shard_stores]).done_pairs()
            with report.stage("matching"):
                shard_results = match_shards([p for p in new_pairs if frozenset(p) not in held],
                                             store_path=store_path, image_dir=image_dir) or ()
        with open_shard_stores(store_path, store.config, image_dir) as shard_stores:
            in_shards = StoreChain(shard_stores).done_pairs()
            with report.stage("matching"):
                matched = match_into_store(matcher, [p for p in new_pairs if frozenset(p) not in in_shards], store,
                                           progress)
            with report.stage("consolidation"):
                chain = StoreChain([store, *shard_stores])
                scratch = consolidation_scratch(database)
                shutil.rmtree(scratch, ignore_errors=True)  # what a killed run left
                scratch.mkdir()
                try:
                    result = consolidate_out_of_core(new_pairs, lambda ix: chain.get_many([new_pairs[i] for i in ix]),
                                                     keypoint_conf, fixed=fixed, workdir=scratch, progress=progress)
                except BaseException:
                    shutil.rmtree(scratch, ignore_errors=True)
                    raise
    try:
        with result:
            match_counts = result.match_counts
            logger.info("consolidated: %d keypoints in %d images, %d matches in %d pairs",
                        sum(result.num_keypoints.values()), len(result.keypoints), sum(match_counts), len(match_counts))
            # images without any match still get an (empty) keypoint set
            empty = {name: ImageKeypoints(name, np.zeros((0, 2))) for name in ids
                     if name not in result.keypoints and name not in with_keypoints}
            with report.stage("database_write"):  # keypoints and matches read back one at a time
                colmap_db.write_features_and_matches(database, ids, ChainMap(result.keypoints, empty), result.matches())
                scores.record(database, ids, ChainMap(result.keypoints.without(result.fixed), empty), result.matches())
            raw_counts = result.raw_counts
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with report.stage("verification"):
        verified = verify_matches(database, pairs, options=verification_options) if pairs else {}
    logger.info("geometric verification: %d of %d pairs kept", sum(1 for v in verified.values() if v > 0),
                len(verified))
    _report_matching(report, matcher, len(pairs), len(new_pairs), matched, raw_counts, match_counts, verified,
                     shard_results)
    return verified


def consolidation_scratch(database: str | os.PathLike) -> Path:
    """The folder beside the database where a run keeps the scratch files of keypoint consolidation
    (:func:`~.keypoints.consolidate_out_of_core`): removed at the end of the run, or by the next run."""
    database = Path(database)
    return database.with_name(database.name + ".mast3r-consolidation")


def _report_matching(report: RunReport, matcher: PairMatcher, num_pairs: int, num_new: int, matched: int,
                     raw_counts: Sequence[int], match_counts: Sequence[int],
                     verified: Mapping[Tuple[str, str], int], shard_results: Sequence[Any] = ()) -> None:
    """Counts and histograms of :func:`match_into_database` for the run report.

    * ``matches_per_pair``: raw matches (the matcher's output) of the pairs written into the database by
      this call (matched now or taken from the match store); ``keypoint_matches_per_pair``: their
      one-to-one keypoint matches after consolidation (what the database gets). Pairs the database held
      already are not in these two.
    * ``inliers_per_verified_pair``: the inliers of every pair of the run after geometric verification;
      the first bin, [0, 1), holds the pairs that failed it.
    * ``pairs_matched``: pairs matched by the network in this run, by this process and by the shard workers
      (``shard_results``, the :class:`~.executors.ShardResult` of each shard; pairs a shard's store held from
      an earlier attempt count as taken from the store); ``encoder_runs`` likewise.
    * ``pairs_per_s``: those pairs per second of the matching stage (with shards: of all workers together),
      which includes image loading and encoding (the encoder runs are counted; their time is not measured
      apart).
    """
    seconds = report.seconds("matching")
    encodings = getattr(matcher, "encodings", None)
    encoder_runs = getattr(encodings, "misses", None)
    matched += sum(r.matched for r in shard_results)
    if encoder_runs is not None and shard_results:
        shard_runs = [r.encoder_runs for r in shard_results]
        encoder_runs = None if None in shard_runs else encoder_runs + sum(shard_runs)
    report.set_counts(num_pairs=num_pairs, pairs_already_in_database=num_pairs - num_new,
                      pairs_from_store=num_new - matched, pairs_matched=matched,
                      pairs_per_s=matched / seconds if matched and seconds > 0 else None,
                      encoder_runs=encoder_runs,
                      encoder_cache_hits=getattr(encodings, "hits", None),
                      num_matches=int(sum(raw_counts)), num_keypoint_matches=int(sum(match_counts)),
                      num_verified_pairs=sum(1 for v in verified.values() if v > 0))
    report.set_histogram("matches_per_pair", raw_counts)
    report.set_histogram("keypoint_matches_per_pair", list(match_counts))
    report.set_histogram("inliers_per_verified_pair", list(verified.values()))


def _user_focal(config: PipelineConfig) -> bool:
    """Whether the user set the focal of new cameras: ``intrinsics``, or ``image_options`` with
    ``camera_params``, an ``existing_camera_id`` or a ``default_focal_length_factor`` of their own."""
    if config.intrinsics:
        return True
    options = config.image_options
    if options is None:
        return False
    given = options.todict() if isinstance(options, pycolmap.ImageReaderOptions) else dict(options)
    factor = float(given.get("default_focal_length_factor", DEFAULT_FOCAL_LENGTH_FACTOR))
    return (bool(given.get("camera_params")) or int(given.get("existing_camera_id", -1)) >= 0
            or factor != DEFAULT_FOCAL_LENGTH_FACTOR)


def estimate_focal_priors(matcher: PairMatcher, database: str | os.PathLike, image_dir: str | os.PathLike,
                          names: Sequence[str], config: PipelineConfig,
                          listed: Mapping[str, pycolmap.Camera]) -> Dict[str, float]:
    """``{name: focal}`` (original pixels) from the network for the images of ``names`` that are not in the
    database yet and have neither an EXIF focal nor a camera of ``listed``: ``matcher.focal_priors``
    (:meth:`~.matching.matcher.Matcher.focal_priors`, one pass per image through its encoding cache).

    Nothing (``{}``) with ``config.focal_prior`` off, with the user's intrinsics (:func:`_user_focal`), or
    for a matcher without ``focal_priors``. Precedence: EXIF focal > the user's intrinsics > these
    estimates > COLMAP's ``1.2 * max(W, H)``. Run before the images are imported, so that a run stopped
    during this pass has written nothing, and a re-run estimates again.
    """
    if not config.focal_prior:
        return {}
    estimate = getattr(matcher, "focal_priors", None)
    if estimate is None:
        logger.debug("%s has no focal_priors: new cameras without an EXIF focal get COLMAP's default focal",
                     type(matcher).__name__)
        return {}
    if _user_focal(config):
        logger.debug("focal priors: not estimated, the focal of new cameras is the user's")
        return {}
    existing = colmap_db.image_ids(database) if Path(database).is_file() else {}
    todo = [n for n in names if n not in existing and n not in listed
            and read_image_info(Path(image_dir) / n).focal is None]
    if not todo:
        return {}
    estimates = dict(estimate(todo))
    logger.info("focal priors: network estimates for %d of %d new images without an EXIF focal", len(estimates),
                len(todo))
    return estimates


def apply_focal_priors(db: pycolmap.Database, estimates: Mapping[str, float],
                       cameras_before: Iterable[int]) -> Tuple[Dict[int, float], Dict[int, int]]:
    """Give each camera created by this run (not in ``cameras_before``) without a focal prior the median of
    the ``estimates`` of its images, as a prior (:func:`~.export.focal_priors.set_camera_focals`); cameras
    that existed before, or have an EXIF or user focal, never change. Returns ``({camera_id: focal},
    {camera_id: number of images})`` of the cameras set."""
    before = {int(c) for c in cameras_before}
    members: Dict[int, List[str]] = {}
    for image in db.read_all_images():
        if image.name in estimates and int(image.camera_id) not in before:
            members.setdefault(int(image.camera_id), []).append(image.name)
    focals, counts = {}, {}
    for camera_id, images in sorted(members.items()):
        cam = db.read_camera(camera_id)
        if cam.has_prior_focal_length:
            continue
        focals[camera_id] = float(np.median([estimates[n] for n in images]))
        counts[camera_id] = len(images)
        logger.info("camera %d (%dx%d): focal prior %.1f px from the network (median of %d images; COLMAP's "
                    "default %.1f px)", camera_id, cam.width, cam.height, focals[camera_id], len(images),
                    cam.mean_focal_length())
    focal_priors.set_camera_focals(db, focals)
    return focals, counts


@locks_database("database")
def reconstruct(image_dir: str | os.PathLike, database: str | os.PathLike, matcher: PairMatcher,
                config: PipelineConfig = PipelineConfig(), output_dir: Optional[str | os.PathLike] = None,
                export_h5: Optional[str | os.PathLike] = None,
                store_path: Optional[str | os.PathLike] = None,
                descriptors_fn=None, names: Optional[Sequence[str]] = None,
                similarity_fn=None, overwrite: bool = False, report: Optional[RunReport] = None,
                export_3dgs: Optional[str | os.PathLike] = None,
                match_shards: Optional[Callable[..., Any]] = None) -> Dict[str, Any]:
    """Run the whole pipeline; returns a summary dict (the mapping summary when a mapper ran).

    ``names`` (relative image paths) defaults to :func:`usable_images` of ``image_dir``.
    ``descriptors_fn`` / ``similarity_fn`` serve the ``retrieval:*`` pair specs (see
    :func:`~.pairs.pairs_from_spec`; ``similarity_fn``, e.g. ASMK scores, takes precedence).
    An existing database is extended (resumed) only with the same pictures and settings, else a
    ValueError is raised before anything is written; ``overwrite`` deletes the database and the match
    stores first (see :func:`remove_run_files`).

    Matches of shard stores beside the run's store are used (:mod:`~.shards`); ``match_shards`` (a
    sharded run, see :mod:`~.executors`) has the pairs the database lacks matched in shards first (see
    :func:`match_into_database`).

    One run per database: the call holds :func:`~.lock.database_lock` throughout, and a database in use
    by another run raises ValueError at once. Image names that cannot work are refused before any
    matching (:func:`check_image_names`).

    ``report`` (a :class:`~.report.RunReport`, see :mod:`~.report`) gets the settings, the wall time of
    each stage (image_check, pairs, focal_priors, database_write, matching, consolidation, verification,
    hloc_export, mapping), counts, histograms and the model's numbers; a stage that raises is recorded in it before
    the exception goes on. The caller writes it.

    ``export_3dgs``: a folder that gets the model undistorted for Gaussian Splatting after a successful
    mapping (:func:`~.export_3dgs.export_3dgs`; stage export_3dgs). An earlier export there is replaced, a
    folder of someone else or ``mapper="none"`` is refused before any matching.
    """
    report = report if report is not None else RunReport()
    image_dir, database = Path(image_dir), Path(database)
    if not image_dir.is_dir():
        raise ValueError(f"image folder {str(image_dir)!r} does not exist or is not a folder")
    report.update_settings({"image_dir": os.path.abspath(image_dir), **_report_settings(config, export_h5)})
    with report.stage("image_check"):
        names = list(names) if names is not None else usable_images(image_dir, config.strict, config.progress)
        logger.info("%d images in %s", len(names), image_dir)
        check_image_names(names, export_h5=export_h5 is not None)
    report.set_counts(num_images=len(names))
    out = Path(output_dir) if output_dir else mapping.default_output_dir(database)
    if config.mapper != "none":
        mapping.check_output(out)  # a model we did not write is never replaced: refuse before matching
    if export_3dgs is not None:  # no model to export, or a folder we must not replace: refuse before matching
        if config.mapper == "none":
            raise ValueError("export_3dgs (--export-3dgs) needs a model: not with mapper 'none'")
        gs_export.check_output(export_3dgs, overwrite=True, model_dir=out, image_dir=image_dir)

    store_path = Path(store_path) if store_path else default_store_path(database)
    if overwrite:
        remove_run_files(database, store_path)
    if database.exists():  # an existing database must hold these pictures and settings: check before writing
        settings = database_settings(matcher, config.keypoints)
        with MatchStore(store_path, config_key(settings["matcher"]), image_dir) as store:
            provenance.check(database, _image_hashes(store, names), settings)
    report.update_settings(database_settings(matcher, config.keypoints))
    with report.stage("pairs"):
        pairs = pairs_from_spec(config.pairs, names, descriptors_fn=descriptors_fn, seed=config.seed,
                                similarity_fn=similarity_fn)  # a bad pairs file fails before the database is written
    logger.info("%d pairs (%s)", len(pairs), config.pairs)
    cameras = listed_cameras(config.camera_intrinsics, image_dir, names)
    with report.stage("focal_priors"):
        estimates = estimate_focal_priors(matcher, database, image_dir, names, config, cameras)
    estimated = focal_priors.read(database)
    with report.stage("database_write"), colmap_db.open_database(database) as db:
        cameras_before = [c.camera_id for c in db.read_all_cameras()]
        ids = colmap_db.import_images(db, image_dir, names, config.camera_mode, config.camera_model,
                                      config.intrinsics, options=config.image_options, cameras=cameras,
                                      estimated_cameras=estimated)
        focals, counts = apply_focal_priors(db, estimates, cameras_before) if estimates else ({}, {})
    focal_priors.record(database, focals, counts)
    report.set_counts(num_network_focal_priors=len(focals))

    verified = match_into_database(database, ids, pairs, matcher, config.keypoints,
                                   store_path, config.progress, image_dir=image_dir,
                                   verification_options=config.verification_options,
                                   report=report, match_shards=match_shards)
    n_verified = sum(1 for v in verified.values() if v > 0)

    if export_h5 is not None:
        with report.stage("hloc_export"):
            export_hloc(export_h5, database, image_dir, pairs)

    result: Dict[str, Any] = {"num_images": len(names), "num_pairs": len(pairs), "num_verified_pairs": n_verified}
    if config.mapper != "none":
        run = mapping.incremental if config.mapper == "incremental" else mapping.global_mapping
        with report.stage("mapping"):
            rec = run(database, image_dir, out, options=config.mapper_options, seed=config.seed,
                      progress=config.progress)
        if rec is None:  # the mapper logged why and marked the output folder (see mapping)
            result.update(num_registered_images=0)
            if export_3dgs is not None:
                logger.warning("no model: nothing exported for Gaussian Splatting to %s", export_3dgs)
            report.record_error("NoModel", f"the {config.mapper} mapper made no model with at least 2 registered "
                                           f"images ({n_verified} of {len(pairs)} pairs passed geometric "
                                           "verification)", stage="mapping")
        else:
            result.update(mapping.summary(rec, database))
            result["model"] = str(out)
            report.set_model(mapping.summary(rec))
            if export_3dgs is not None:  # the model was rewritten: so is its export (ours only, checked above)
                with report.stage("export_3dgs"):
                    result["export_3dgs"] = str(gs_export.export_3dgs(out, image_dir, export_3dgs, overwrite=True))
    return result


def _report_settings(config: PipelineConfig, export_h5: Optional[str | os.PathLike]) -> Dict[str, Any]:
    """The settings of :class:`PipelineConfig` that a run report records (the matcher's and keypoints'
    come from :func:`database_settings`)."""
    return {"pairs": config.pairs, "camera_mode": normalise_camera_mode(config.camera_mode),
            "camera_model": config.camera_model, "intrinsics": config.intrinsics,
            "camera_intrinsics": (f"{len(config.camera_intrinsics)} cameras"
                                  if isinstance(config.camera_intrinsics, Mapping) else config.camera_intrinsics),
            "image_options": config.image_options, "verification_options": config.verification_options,
            "mapper": config.mapper, "mapper_options": config.mapper_options, "strict": config.strict,
            "seed": config.seed, "export_h5": export_h5, "focal_prior": config.focal_prior}


def export_hloc(folder: str | os.PathLike, database: str | os.PathLike, image_dir: str | os.PathLike,
                pairs: Sequence[Tuple[str, str]]) -> None:
    """Write ``features.h5``, ``matches.h5`` and ``pairs.txt`` in hloc's layout into ``folder``, from the
    database: every image of ``pairs`` and every pair of ``pairs``, also those matched by earlier runs.

    Each file is written completely and atomically (hloc never reads a half-written file). Scores come
    from :mod:`.export.scores` (1 where the database has none, e.g. a database made by another tool).
    """
    from .images import read_image_size

    pairs = [(str(a), str(b)) for a, b in pairs]
    names = sorted({name for pair in pairs for name in pair})
    with colmap_db.open_database(database) as db:
        ids = colmap_db.image_ids(db)
        missing = [n for n in names if n not in ids]
        if missing:
            raise ValueError(f"cannot export {len(missing)} image(s) that are not in the database: {missing[:5]}")
        stored = colmap_db.existing_keypoints(db)
        raw = {pair: colmap_db.read_pair_matches(db, ids, *pair) for pair in pairs}  # rows in COLMAP's order
    kp_scores = scores.read_keypoint_scores(database, [ids[n] for n in names])
    keypoints = {n: ImageKeypoints(n, stored.get(n, np.zeros((0, 2))), kp_scores.get(ids[n])) for n in names}
    pair_ids = {pair: int(pycolmap.image_pair_to_pair_id(ids[pair[0]], ids[pair[1]])) for pair in pairs}
    match_scores = scores.read_match_scores(database, pair_ids.values())
    matches = []
    for pair, idx in raw.items():
        matches.append(IndexMatches(pair[0], pair[1], idx, match_scores.get(pair_ids[pair])))

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {name: read_image_size(Path(image_dir) / name) for name in names}
    hloc_h5.write_features(folder / "features.h5", keypoints, sizes, replace=True)
    hloc_h5.write_matches(folder / "matches.h5", matches, {n: len(k) for n, k in keypoints.items()}, replace=True)
    write_pairs(folder / "pairs.txt", pairs)
    logger.info("hloc files written to %s: %d images, %d pairs", folder, len(names), len(pairs))
