"""MASt3R as a dense matcher of hloc: ``confs`` and ``main`` with the semantics of ``hloc.match_dense``.

Swap LoFTR for MASt3R in an hloc script by replacing ``match_dense`` with this module::

    from mast3r_colmap import hloc as mast3r_dense
    features, matches = mast3r_dense.main(mast3r_dense.confs["mast3r"], pairs, images, outputs)
    reconstruction.main(sfm_dir, images, pairs, features, matches)

:func:`main` takes the arguments of ``hloc.match_dense.main`` and returns the same ``(features, matches)``
paths, named the same way: ``feats_<output>.h5`` and ``<output>_<pairs stem>.h5`` under ``export_dir``
unless given as paths. What it does, per call:

1. the pairs of the file (``q r`` lines; a pair listed in both orders once), minus those already in
   the matches file unless ``overwrite``;
2. images with keypoints in ``features_ref`` files or in the output features file (unless
   ``overwrite``) are **fixed**: their keypoints stay as they are, and new observations snap to the
   nearest one within ``max_error`` px; the other images are new;
3. the pairs are matched through the resumable store beside the matches file
   (``<matches>.mast3r-matches.sqlite``, keyed by image content and weights): each image is encoded once
   per call and the pairs are ordered for the encoding cache, as in the command line. An interrupted call
   resumes where it stopped; ``overwrite`` redoes keypoints and matches, but raw matches of unchanged
   pictures and weights still come from the store;
4. :func:`~mast3r_colmap.keypoints.consolidate` turns the raw matches into shared keypoints (one per
   network pixel, or per full-resolution pixel with the crops of ``mast3r_hires``; ``max_kps`` per new
   image) and one-to-one matches. With ``max_kps=None``, a new image paired with a fixed image is a
   localisation query, as in hloc: its keypoints are the raw positions, unquantised;
5. the keypoints of the new images are added to the features file (``keypoints``, ``scores``,
   ``image_size``) and the matches of the new pairs to the matches file (``matches0``,
   ``matching_scores0``), both written atomically (:mod:`~mast3r_colmap.export.hloc_h5`); other entries
   stay.

hloc's readers, ``reconstruction.main``, ``triangulation.main`` and ``localize_sfm.main`` run unchanged on
these files (``tests/test_hloc_api.py``). With pycolmap 4, call ``triangulation.main`` with
``estimate_two_view_geometries=True``: its default known-pose path writes two-view geometries without a
configuration (UNDEFINED), which pycolmap 4 ignores, so it would triangulate no points.

Command line (like hloc's scripts)::

    python -m mast3r_colmap.hloc --conf mast3r --pairs pairs.txt --image_dir images --export_dir outputs
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import pprint
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import h5py
import numpy as np

from . import cli
from .export import hloc_h5
from .images import read_image_size
from .keypoints import KeypointConfig, consolidate
from .pairs import read_pairs
from .pipeline import PairMatcher, check_image_names, default_store_path, match_into_store
from .store import MatchStore, config_key
from .structures import ImageKeypoints

__all__ = ["confs", "main"]

logger = logging.getLogger(__name__)

#: the official MASt3R weights (hub id), as :data:`~mast3r_colmap.model.checkpoint.DEFAULT_CHECKPOINT`
CHECKPOINT = "naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric"
_MODEL = {"name": "mast3r", "checkpoint": CHECKPOINT, "preset": "default", "device": None, "precision": "fp32"}

#: hloc-style configurations. ``model``: ``checkpoint`` (an official .pth file, a hub folder or hub id),
#: ``device`` (None: cuda if available), ``precision`` (fp32, bf16, fp16) and ``preset``, a matcher preset
#: (:data:`~mast3r_colmap.matching.matcher.confs`); ``cell_size`` and ``max_error`` (px at full resolution)
#: are hloc's keypoint settings (see :class:`~mast3r_colmap.keypoints.KeypointConfig`); the keypoint cap is
#: ``main``'s ``max_kps``, as in hloc (8192 for mapping, None for localisation queries).
confs: Dict[str, Dict[str, Any]] = {
    # one 512-px pass per pair: the official COLMAP-export matching
    "mast3r": {
        "output": "matches-mast3r",
        "model": {**_MODEL},
        "cell_size": 4,
        "max_error": 4,
    },
    # coarse-to-fine: full-resolution crops for images larger than 512 px (more accurate, slower)
    "mast3r_hires": {
        "output": "matches-mast3r_hires",
        "model": {**_MODEL, "preset": "hires"},
        "cell_size": 4,
        "max_error": 4,
    },
    # MASt3R-SfM's symmetric matching and sqrt(q0 * q1) scores
    "mast3r_sfm": {
        "output": "matches-mast3r_sfm",
        "model": {**_MODEL, "preset": "sfm"},
        "cell_size": 4,
        "max_error": 4,
    },
    # Aachen v1.1 (the settings of mast3r_colmap.pipelines.aachen), in half precision on a GPU
    "mast3r_aachen": {
        "output": "matches-mast3r_aachen",
        "model": {**_MODEL, "precision": "bf16"},
        "cell_size": 4,
        "max_error": 4,
    },
}

PathLike = Union[str, os.PathLike]


def keypoint_config(conf: Dict[str, Any], max_kps: Optional[int]) -> KeypointConfig:
    """The :class:`KeypointConfig` of a conf (``cell_size``, ``max_error``) and ``main``'s ``max_kps``."""
    return KeypointConfig(cell_size=float(conf.get("cell_size", KeypointConfig.cell_size)),
                          max_kps=max_kps or None,
                          max_error=None if conf.get("max_error") is None else float(conf["max_error"]))


def build_matcher(conf: Dict[str, Any], image_dir: PathLike) -> PairMatcher:
    """Load the network of ``conf["model"]`` and wrap it in a :class:`~.matching.matcher.Matcher`."""
    from .matching.matcher import Matcher, get_config

    model_conf = {**_MODEL, **conf.get("model", {})}
    if model_conf["name"] != "mast3r":
        raise ValueError(f"unknown model {model_conf['name']!r}: this module runs MASt3R")
    checkpoint = model_conf["checkpoint"] or CHECKPOINT
    matcher_conf = get_config(model_conf["preset"], **model_conf.get("matcher", {}))  # bad preset: before loading
    if model_conf["precision"] not in cli.PRECISIONS:
        raise ValueError(f"unknown precision {model_conf['precision']!r}: choose from {', '.join(cli.PRECISIONS)}")
    network = cli.load_network(SimpleNamespace(checkpoint=checkpoint, device=model_conf["device"],
                                               precision=model_conf["precision"]))
    return Matcher(network, matcher_conf, image_dir=image_dir, checkpoint=str(checkpoint))


def _unique_pairs(pairs: Sequence[Tuple[str, str]], matches: Path, overwrite: bool) -> List[Tuple[str, str]]:
    """hloc's ``find_unique_new_pairs``: one orientation per pair (the first listed), no self-pairs, and
    without ``overwrite`` none that the matches file holds already (in any of hloc's four key forms)."""
    seen: Set[frozenset] = set()
    unique = []
    for a, b in pairs:
        if a != b and frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            unique.append((a, b))
    if overwrite or not matches.exists():
        return unique
    todo = []
    with h5py.File(matches, "r", libver="latest") as f:
        for a, b in unique:
            try:
                hloc_h5.find_pair(f, a, b)
            except KeyError:
                todo.append((a, b))
    return todo


def _read_keypoints(paths: Sequence[Path], names: Set[str]) -> Dict[str, np.ndarray]:
    """Keypoints (hloc's convention) of those ``names`` that the features files hold; the first file wins."""
    out: Dict[str, np.ndarray] = {}
    for path in paths:
        try:
            held = set(hloc_h5.list_h5_names(path)) & (names - set(out))
            out.update({n: k.keypoints for n, k in hloc_h5.read_features(path, sorted(held)).items()})
        except (OSError, KeyError) as exc:
            raise ValueError(f"cannot read the features file {str(path)!r}: {exc}") from None
    return out


def main(conf: Dict[str, Any], pairs: PathLike, image_dir: PathLike, export_dir: Optional[PathLike] = None,
         matches: Optional[PathLike] = None, features: Optional[PathLike] = None,
         features_ref: Optional[Union[PathLike, List[PathLike]]] = None, max_kps: Optional[int] = 8192,
         overwrite: bool = False, matcher: Optional[PairMatcher] = None, progress: bool = True) -> Tuple[Path, Path]:
    """hloc's ``match_dense.main`` with MASt3R (see the module docstring); returns ``(features, matches)``.

    ``features`` / ``matches`` given as paths (``pathlib.Path``) are the output files; otherwise ``features``
    is a prefix (default ``feats_``) and the files are ``<export_dir>/<prefix><output>.h5`` and
    ``<export_dir>/<output>_<pairs stem>.h5``. ``matcher`` (anything with ``settings`` and ``match_pairs``,
    e.g. a :class:`~.matching.matcher.Matcher` over a test network) replaces the network of
    ``conf["model"]``, which is otherwise loaded only when there is something to match.
    """
    logger.info("MASt3R dense matching with configuration:\n%s", pprint.pformat(conf))
    pairs, image_dir = Path(pairs), Path(image_dir)
    if features is None:
        features = "feats_"
    if isinstance(features, Path):
        features_q = features
        if matches is None:
            raise ValueError("Either provide both features and matches as Path or both as names.")
    else:
        if export_dir is None:
            raise ValueError(f"Provide an export_dir if features and matches are not file paths: "
                             f"{features}, {matches}.")
        features_q = Path(export_dir, f"{features}{conf['output']}.h5")
        if matches is None:
            matches = Path(export_dir, f"{conf['output']}_{pairs.stem}.h5")
    matches = Path(matches)
    if features_ref is None:
        refs: List[Path] = []
    elif isinstance(features_ref, (list, tuple)):
        refs = [Path(p) for p in features_ref]
    elif isinstance(features_ref, (str, os.PathLike)):
        refs = [Path(features_ref)]
    else:
        raise TypeError(str(features_ref))
    for path in refs:
        if not path.is_file():
            raise FileNotFoundError(f"Reference feature file {path}.")
    if not image_dir.is_dir():
        raise ValueError(f"image folder {str(image_dir)!r} does not exist or is not a folder")
    max_kps = max_kps or None
    kp_conf = keypoint_config(conf, max_kps)

    todo = _unique_pairs(read_pairs(pairs), matches, overwrite)
    names = {n for pair in todo for n in pair}
    check_image_names(sorted(names), export_h5=True)
    sources = refs + ([features_q] if features_q.exists() else [])
    fixed = _read_keypoints(refs, names)
    if features_q.exists() and not overwrite:
        fixed.update(_read_keypoints([features_q], names - set(fixed)))
    new = names - set(fixed)
    if not todo:
        logger.info("All pairs exist. Skipping dense matching.")
        return features_q, matches
    logger.info("%d pairs to match: %d new images, %d with fixed keypoints (%s)", len(todo), len(new),
                len(fixed), ", ".join(str(p) for p in sources) or "none")
    for path in (features_q, matches):
        path.parent.mkdir(parents=True, exist_ok=True)

    if matcher is None:
        matcher = build_matcher(conf, image_dir)
    with MatchStore(default_store_path(matches), config_key(matcher.settings()), image_dir) as store:
        match_into_store(matcher, todo, store, progress)
        # hloc's localisation case: with no cap, a new image matched against fixed ones keeps its raw positions
        queries = set()
        if max_kps is None:
            queries = {a if b in fixed else b for a, b in todo if (a in fixed) != (b in fixed)}
        keypoints, index_matches = consolidate(store.get_many(todo), kp_conf, fixed=fixed, unquantized=queries)

    new_keypoints = {n: keypoints.get(n, ImageKeypoints(n, np.zeros((0, 2)))) for n in sorted(new)}
    sizes = {n: read_image_size(image_dir / n) for n in new_keypoints}
    num_keypoints = {**{n: len(k) for n, k in fixed.items()}, **{n: len(k) for n, k in new_keypoints.items()}}
    hloc_h5.write_features(features_q, new_keypoints, sizes)
    hloc_h5.write_matches(matches, index_matches, num_keypoints)
    logger.info("%d keypoints in %d new images (%s), %d matches in %d pairs (%s)",
                sum(len(k) for k in new_keypoints.values()), len(new_keypoints), features_q,
                sum(len(m) for m in index_matches), len(index_matches), matches)
    return features_q, matches


# ---- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m mast3r_colmap.hloc", __doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=Path, required=True, help="hloc pairs file")
    p.add_argument("--image_dir", type=Path, required=True)
    p.add_argument("--export_dir", type=Path, required=True)
    p.add_argument("--conf", choices=list(confs), default="mast3r")
    p.add_argument("--matches", type=Path, default=None,
                   help="matches file; None: <output>_<pairs stem>.h5 in --export_dir")
    p.add_argument("--features", type=str, default="feats_",
                   help="features file name prefix in --export_dir (feats_ gives feats_<output>.h5)")
    p.add_argument("--features_ref", type=Path, nargs="*", default=None,
                   help="features files whose keypoints stay fixed (e.g. a reference map)")
    p.add_argument("--max_kps", type=int, default=8192, help="keypoints per new image (0: no cap, localisation)")
    p.add_argument("--overwrite", action="store_true", help="match again the pairs the matches file holds")
    cli.add_model_arguments(p)
    p.set_defaults(checkpoint=None, precision=None)  # None: the conf's
    p.add_argument("--preset", choices=["default", "hires", "sfm"], default=None,
                   help="matcher preset; None: the conf's")
    cli.add_matcher_arguments(p)
    cli.add_logging_arguments(p)
    return p


def _run(args: argparse.Namespace) -> int:
    conf = copy.deepcopy(confs[args.conf])
    for key in ("checkpoint", "device", "precision", "preset"):
        if getattr(args, key) is not None:
            conf["model"][key] = getattr(args, key)
    conf["model"]["matcher"] = {**conf["model"].get("matcher", {}), **cli.matcher_overrides(args)}
    if not args.pairs.is_file():
        raise ValueError(f"pairs file {str(args.pairs)!r} does not exist")
    if args.max_kps < 0:
        raise ValueError(f"--max_kps must be >= 0, got {args.max_kps}")
    features, matches = main(conf, args.pairs, args.image_dir, args.export_dir, matches=args.matches,
                             features=args.features, features_ref=args.features_ref, max_kps=args.max_kps or None,
                             overwrite=args.overwrite, progress=not args.no_progress)
    print(f"features: {features}\nmatches: {matches}")
    return 0


def main_cli(argv: Optional[List[str]] = None) -> int:
    """Command line entry point; bad input gives a message and exit code 2."""
    return cli.main(build_parser(), _run, argv, "run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main_cli())
