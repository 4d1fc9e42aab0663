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

Re-runs never mix inputs: stored matches are reused only for unchanged image files and weights (see
:mod:`~.store`), and a database records the pictures and settings that filled it
(:mod:`~.export.provenance`): a re-run with a changed picture or other settings is refused before any
matching, unless ``overwrite`` starts the database and the match store afresh.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import pycolmap
from tqdm import tqdm

from . import mapping
from .cameras import normalise_camera_mode, read_camera_list, read_image_info
from .export import colmap_db, hloc_h5, provenance, scores
from .images import ImageLoadError, list_images, validate_image
from .keypoints import KeypointConfig, consolidate
from .lock import locks_database
from .matching.schedule import schedule_pairs
from .options import build as build_options
from .pairs import pairs_from_spec, write_pairs
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
    """Delete a run's database and match store (default :func:`default_store_path`) with their SQLite
    ``-wal`` / ``-shm`` companions, and nothing else; returns the files deleted."""
    removed = []
    for path in (Path(database), Path(store_path) if store_path else default_store_path(database)):
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
                     progress: bool = True) -> int:
    """Match the pairs the store does not hold yet, committing each as it finishes.

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
                        image_dir: Optional[str | os.PathLike] = None, verification_options: Any = None):
    """Match the pairs the database lacks (through the resumable store), consolidate keypoints (images
    that already have keypoints keep them), write keypoints and matches in one transaction, verify.

    First the image files (under ``image_dir``, default ``matcher.image_dir``; without one, only the
    settings) and :func:`database_settings` are checked against what the database records, and recorded:
    a changed picture or other settings raise a ValueError before any matching.

    ``verification_options`` (``pycolmap.TwoViewGeometryOptions`` or a dict) go to
    :func:`~.verification.verify_matches`; pairs verified by an earlier run keep their two-view geometry.

    Returns ``(keypoints, matches, verified)``: the consolidated values of this call and
    ``{pair: number of inliers}`` of the verification of ``pairs``.
    """
    image_dir = image_dir if image_dir is not None else getattr(matcher, "image_dir", None)
    settings = database_settings(matcher, keypoint_conf)
    store_path = Path(store_path) if store_path else default_store_path(database)
    with MatchStore(store_path, config_key(settings["matcher"]), image_dir) as store:
        hashes = _image_hashes(store, ids)
        provenance.check(database, hashes, settings)
        provenance.record(database, hashes, settings)
        with colmap_db.open_database(database) as db:
            in_db = colmap_db.existing_pairs(db)
            fixed = colmap_db.existing_keypoints(db)
        new_pairs = [tuple(p) for p in pairs if frozenset(p) not in in_db]
        if len(new_pairs) < len(pairs):
            logger.info("%d pairs already matched in the database, skipped", len(pairs) - len(new_pairs))
        match_into_store(matcher, new_pairs, store, progress)
        keypoints, matches = consolidate(store.get_many(new_pairs), keypoint_conf, fixed=fixed)
    logger.info("consolidated: %d keypoints in %d images, %d matches in %d pairs",
                sum(len(k) for k in keypoints.values()), len(keypoints),
                sum(len(m) for m in matches), len(matches))
    for name in ids:  # images without any match still get an (empty) keypoint set
        if name not in keypoints and name not in fixed:
            keypoints[name] = ImageKeypoints(name, np.zeros((0, 2)))
    colmap_db.write_features_and_matches(database, ids, keypoints, matches)
    scores.record(database, ids, {n: k for n, k in keypoints.items() if n not in fixed}, matches)
    verified = verify_matches(database, pairs, options=verification_options) if pairs else {}
    logger.info("geometric verification: %d of %d pairs kept", sum(1 for v in verified.values() if v > 0),
                len(verified))
    return keypoints, matches, verified


@locks_database("database")
def reconstruct(image_dir: str | os.PathLike, database: str | os.PathLike, matcher: PairMatcher,
                config: PipelineConfig = PipelineConfig(), output_dir: Optional[str | os.PathLike] = None,
                export_h5: Optional[str | os.PathLike] = None,
                store_path: Optional[str | os.PathLike] = None,
                descriptors_fn=None, names: Optional[Sequence[str]] = None,
                similarity_fn=None, overwrite: bool = False) -> Dict[str, Any]:
    """Run the whole pipeline; returns a summary dict (the mapping summary when a mapper ran).

    ``names`` (relative image paths) defaults to :func:`usable_images` of ``image_dir``.
    ``descriptors_fn`` / ``similarity_fn`` serve the ``retrieval:*`` pair specs (see
    :func:`~.pairs.pairs_from_spec`; ``similarity_fn``, e.g. ASMK scores, takes precedence).
    An existing database is extended (resumed) only with the same pictures and settings, else a
    ValueError is raised before anything is written; ``overwrite`` deletes the database and the match
    store first (see :func:`remove_run_files`).

    One run per database: the call holds :func:`~.lock.database_lock` throughout, and a database in use
    by another run raises ValueError at once. Image names that cannot work are refused before any
    matching (:func:`check_image_names`).
    """
    image_dir, database = Path(image_dir), Path(database)
    if not image_dir.is_dir():
        raise ValueError(f"image folder {str(image_dir)!r} does not exist or is not a folder")
    names = list(names) if names is not None else usable_images(image_dir, config.strict, config.progress)
    logger.info("%d images in %s", len(names), image_dir)
    check_image_names(names, export_h5=export_h5 is not None)
    out = Path(output_dir) if output_dir else mapping.default_output_dir(database)
    if config.mapper != "none":
        mapping.check_output(out)  # a model we did not write is never replaced: refuse before matching

    store_path = Path(store_path) if store_path else default_store_path(database)
    if overwrite:
        remove_run_files(database, store_path)
    if database.exists():  # an existing database must hold these pictures and settings: check before writing
        settings = database_settings(matcher, config.keypoints)
        with MatchStore(store_path, config_key(settings["matcher"]), image_dir) as store:
            provenance.check(database, _image_hashes(store, names), settings)
    pairs = pairs_from_spec(config.pairs, names, descriptors_fn=descriptors_fn, seed=config.seed,
                            similarity_fn=similarity_fn)  # a bad pairs file fails before the database is written
    logger.info("%d pairs (%s)", len(pairs), config.pairs)
    cameras = listed_cameras(config.camera_intrinsics, image_dir, names)
    with colmap_db.open_database(database) as db:
        ids = colmap_db.import_images(db, image_dir, names, config.camera_mode, config.camera_model,
                                      config.intrinsics, options=config.image_options, cameras=cameras)

    keypoints, matches, verified = match_into_database(database, ids, pairs, matcher, config.keypoints,
                                                       store_path, config.progress, image_dir=image_dir,
                                                       verification_options=config.verification_options)
    n_verified = sum(1 for v in verified.values() if v > 0)

    if export_h5 is not None:
        export_hloc(export_h5, database, image_dir, pairs)

    result: Dict[str, Any] = {"num_images": len(names), "num_pairs": len(pairs), "num_verified_pairs": n_verified}
    if config.mapper != "none":
        run = mapping.incremental if config.mapper == "incremental" else mapping.global_mapping
        rec = run(database, image_dir, out, options=config.mapper_options, seed=config.seed)
        if rec is None:  # the mapper logged why and marked the output folder (see mapping)
            result.update(num_registered_images=0)
        else:
            result.update(mapping.summary(rec))
            result["model"] = str(out)
    return result


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
