"""SfM accuracy of keypoint consolidation: ours against hloc's dense aggregation and per-pixel keypoints.

Synthetic scenes with known geometry (:mod:`mast3r_colmap.testing.synthetic`) are matched by the production
``Matcher`` (the ``default`` preset: one 512-px FRM pass; ``hires``: coarse-to-fine with full-resolution
crops) over the synthetic descriptor source, at each descriptor noise level. The same stored raw matches
then go through every route of :mod:`mast3r_colmap.testing.accuracy`:

* ``ours``: ``mast3r_colmap.keypoints.consolidate`` with the default ``KeypointConfig`` (what the package does);
* ``hloc-loftr`` / ``hloc-loftr_aachen``: hloc's real ``aggregate_matches`` + ``assign_matches``
  (``../shared/third_party/hloc``) with those ``match_dense.confs`` and hloc's default cap of 8192;
* ``lattice``: one keypoint per sampled pixel (network pixel, or full-resolution crop pixel), no cap, matches
  by pixel index (what the official MASt3R COLMAP export does);
* only when named in ``--routes``: ``ours-uncapped`` and ``ours-8192``, ours with ``KeypointConfig(max_kps=None)``
  and with ``max_kps=8192``.

Each route's keypoints and matches go into a fresh COLMAP database, verified and mapped incrementally with
the same options and seed. One markdown table per scene and noise level: a row per route, each value the
mean over the seeds; centre and point errors in 1e-4 of the scene size (point error: median distance of
the 3D points, after the similarity alignment of the centres, to the true surfaces). Below each table, per
error column, whether ours is best or tied: ``ours mean <= best other mean + the largest of the two
standard deviations over the seeds and 2 % of the best mean`` (two mappings of identical keypoints differ
by about 1 %: multi-threaded bundle adjustment), plus registration and the time ratio.

    python benchmarks/bench_sfm_accuracy.py --quick          # minutes: small scenes, one seed
    python benchmarks/bench_sfm_accuracy.py                  # the full configuration (hours on 2 CPU cores)
    python benchmarks/bench_sfm_accuracy.py --scenes planes10 --seeds 0 --noise 0

Rendered images and raw matches are cached per scene and seed under ``--cache`` (matches in a
``MatchStore`` keyed by the matcher's settings, noise included), so re-runs only consolidate and map.
On a 2-core CPU, one ``default`` pair at 1600x1200 takes about 2-5 s to match, one ``hires`` pair 1.5-3
minutes (about 20 full-resolution crop pairs; fast reciprocal matching of the crops is most of it), and
rendering takes 4-15 s per 1600x1200 image. Measured 2026-12-02 with other work on the machine: the full
``planes10`` (3 seeds, both noise levels) in 42 minutes, ``planes4-hires`` in 82 minutes (one torch thread),
``box30`` in about 2.5 hours.
"""

from __future__ import annotations

import os
import sys

if "--progress" not in sys.argv:  # hloc's progress bars: tqdm reads TQDM_DISABLE when it is imported
    os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import mast3r_colmap  # noqa: F401  (first: it loads Pillow before pycolmap)
import numpy as np
import pycolmap
import torch

from mast3r_colmap.keypoints import KeypointConfig
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.pairs import pairs_from_spec
from mast3r_colmap.testing import accuracy
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene

logger = logging.getLogger("bench_sfm_accuracy")

HLOC_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "third_party" / "hloc"


@dataclass(frozen=True)
class SceneSpec:
    """A synthetic scene, how it is matched and which pairs."""

    kind: str                   # "planes" or "box" (see SyntheticScene.make)
    images: int
    size: Tuple[int, int]       # (W, H)
    preset: str                 # matcher preset
    pairs: str                  # pairs spec (pairs_from_spec)
    image_size: int = 512       # network resolution


#: The full configuration of the issue: >= 1600 px, one scene of 30 images, both matcher paths.
SCENES: Dict[str, SceneSpec] = {
    "planes10": SceneSpec("planes", 10, (1600, 1200), "default", "exhaustive"),
    "box30": SceneSpec("box", 30, (1600, 1200), "default", "sequential:3:loop"),
    "planes4-hires": SceneSpec("planes", 4, (1600, 1200), "hires", "sequential:2"),
}
#: --quick: the same scenes, smaller (a few minutes in all).
QUICK: Dict[str, SceneSpec] = {
    "planes10": SceneSpec("planes", 8, (800, 600), "default", "exhaustive", image_size=256),
    "box30": SceneSpec("box", 12, (800, 600), "default", "sequential:3:loop", image_size=256),
    "planes4-hires": SceneSpec("planes", 4, (512, 384), "hires", "sequential:2", image_size=256),
}
#: Two mappings of the same keypoints differ a little (multi-threaded bundle adjustment): a relative gap up to
#: this much is a tie even with one seed.
TIE_FLOOR = 0.02
ROUTES = ("ours", "hloc-loftr", "hloc-loftr_aachen", "lattice")
#: Routes run only when named in --routes: ours with no keypoint cap, and with hloc's cap of 8192 (--max-kps).
EXTRA_ROUTES = ("ours-uncapped", "ours-8192")
#: (column, RouteResult field, format, scale, is an error column)
COLUMNS = [
    ("reg", "registered", "{:.1f}", 1.0, False),
    ("points", "points", "{:.0f}", 1.0, False),
    ("track", "track_length", "{:.2f}", 1.0, False),
    ("reproj px", "reprojection_px", "{:.3f}", 1.0, True),
    ("rot med deg", "median_rotation_deg", "{:.4f}", 1.0, True),
    ("rot max deg", "max_rotation_deg", "{:.4f}", 1.0, True),
    ("ctr med", "median_center", "{:.3f}", 1e4, True),
    ("ctr max", "max_center", "{:.3f}", 1e4, True),
    ("point err", "median_point", "{:.3f}", 1e4, True),
    ("kps/img", "keypoints_per_image", "{:.0f}", 1.0, False),
    ("consol. s", "consolidation_s", "{:.2f}", 1.0, False),
    ("verify s", "verification_s", "{:.1f}", 1.0, False),
    ("map s", "mapping_s", "{:.1f}", 1.0, False),
]


def scene_folder(cache: Path, name: str, spec: SceneSpec, seed: int) -> Path:
    w, h = spec.size
    return cache / f"{name}-{spec.kind}{spec.images}-{w}x{h}-seed{seed}"


def prepare_images(scene: SyntheticScene, folder: Path) -> Path:
    """The scene's images under ``folder/images``, rendered unless this very scene wrote them there."""
    images = folder / "images"
    stamp = folder / "scene.txt"
    digest = SyntheticNetwork(scene).settings()["scene"]
    if not (stamp.is_file() and stamp.read_text() == digest and all((images / n).is_file() for n in scene.names)):
        started = time.perf_counter()
        shutil.rmtree(images, ignore_errors=True)
        scene.write_images(images)
        stamp.write_text(digest)
        logger.info("rendered %d images in %.1f s", len(scene.names), time.perf_counter() - started)
    return images


def match_quality(scene: SyntheticScene, pair_matches) -> Tuple[float, float]:
    """Median error (px) of the raw matches against the true correspondences, and the share beyond 5 px."""
    errors = []
    for pm in pair_matches:
        xy1, valid = scene.true_correspondences(pm.name0, pm.name1, pm.xy0)
        e = np.linalg.norm(xy1 - pm.xy1, axis=1)
        errors.append(np.where(valid, e, np.inf))
    e = np.concatenate(errors) if errors else np.zeros(0)
    return (float(np.median(e)), float((e > 5).mean())) if len(e) else (math.nan, math.nan)


def run_one(name: str, spec: SceneSpec, noise: float, seed: int, routes: Sequence[str], cache: Path,
            match_dense, mapper_options: dict, progress: bool = False) -> List[accuracy.RouteResult]:
    """Match one scene (or reuse its cached matches) and run every route on the same matches."""
    scene = SyntheticScene.make(num_cameras=spec.images, image_size=spec.size, seed=seed, kind=spec.kind)
    folder = scene_folder(cache, name, spec, seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = prepare_images(scene, folder)
    matcher = Matcher(SyntheticNetwork(scene, noise=noise), get_config(spec.preset, image_size=spec.image_size),
                      image_dir=images)
    pairs = pairs_from_spec(spec.pairs, scene.names)
    pair_matches = accuracy.collect_matches(matcher, pairs, folder / "matches.sqlite", images)
    med, outliers = match_quality(scene, pair_matches)
    logger.info("%s noise %g seed %d: %d pairs, %.0f raw matches per pair, median error %.2f px, %.1f%% > 5 px",
                name, noise, seed, len(pairs), np.mean([len(p) for p in pair_matches]), med, 100 * outliers)
    results = []
    with tempfile.TemporaryDirectory(prefix="sfm-accuracy-", dir=cache) as tmp:
        for route in routes:
            if route == "ours":
                out = accuracy.ours(pair_matches)
            elif route == "ours-uncapped":
                out = accuracy.ours(pair_matches, KeypointConfig(max_kps=None))
            elif route == "ours-8192":
                out = accuracy.ours(pair_matches, KeypointConfig(max_kps=accuracy.HLOC_MAX_KPS))
            elif route == "lattice":
                out = accuracy.lattice_keypoints(pair_matches, matcher.image)
            else:
                conf = match_dense.confs[route[len("hloc-"):]]
                out = accuracy.hloc_aggregation(pair_matches, match_dense, conf, Path(tmp) / route / "hloc")
            result = accuracy.map_and_score(route, out, scene, images, Path(tmp) / route, pairs,
                                            mapper_options, seed, progress=progress)
            logger.info("  %-18s %s", route, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in result.asdict().items() if k != "route"))
            results.append(result)
    return results


def _stats(results: List[accuracy.RouteResult], field: str, scale: float) -> Tuple[float, float]:
    values = np.array([getattr(r, field) for r in results], np.float64) * scale
    if np.isnan(values).any():
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def table(title: str, by_route: Dict[str, List[accuracy.RouteResult]]) -> str:
    """The markdown table of one scene and noise level (means over seeds) and the verdict lines."""
    seeds = len(next(iter(by_route.values())))
    head = ["route"] + [c[0] for c in COLUMNS]
    lines = [f"### {title} ({seeds} seed{'s' if seeds > 1 else ''}; ctr/point errors in 1e-4 scene size)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for route, results in by_route.items():
        cells = [route]
        for _, field, fmt, scale, is_error in COLUMNS:
            mean, sd = _stats(results, field, scale)
            cells.append(fmt.format(mean) + (f" ±{fmt.format(sd)}" if seeds > 1 and is_error else ""))
        lines.append("| " + " | ".join(cells) + " |")
    if "ours" in by_route and any(not r.startswith("ours") for r in by_route):
        lines.append("")
        verdicts = []
        for label, field, fmt, scale, is_error in COLUMNS:
            if not is_error:
                continue
            ours_mean, ours_sd = _stats(by_route["ours"], field, scale)
            others = {r: _stats(res, field, scale) for r, res in by_route.items() if not r.startswith("ours")}
            best = min(others, key=lambda r: others[r][0] if not math.isnan(others[r][0]) else math.inf)
            best_mean, best_sd = others[best]
            if math.isnan(ours_mean):
                word = "FAILED"
            elif ours_mean <= best_mean:
                word = "best"
            elif ours_mean <= best_mean + max(ours_sd, best_sd, TIE_FLOOR * best_mean):
                word = "tied"
            else:
                word = "WORSE"
            verdicts.append(f"{label}: {word} ({fmt.format(ours_mean)} vs {best} {fmt.format(best_mean)})")
        lines.append("ours on every error column: " + "; ".join(verdicts))
        registered = all(r.registered == r.num_images for r in by_route["ours"])
        extra = [f"all images registered by ours: {'yes' if registered else 'NO'}"]
        hloc_times = [np.mean([r.consolidation_s for r in res]) for k, res in by_route.items() if k.startswith("hloc")]
        if hloc_times:
            ratio = min(hloc_times) / max(np.mean([r.consolidation_s for r in by_route["ours"]]), 1e-9)
            extra.append(f"consolidation {ratio:.0f}x faster than the fastest hloc route")
        lines.append("; ".join(extra))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small scenes (see QUICK) and one seed unless --seeds")
    ap.add_argument("--scenes", nargs="+", choices=list(SCENES), default=list(SCENES))
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="scene and mapping seeds (default 0 1 2)")
    ap.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.05],
                    help="descriptor noise levels of the synthetic network (per component; a unit descriptor's "
                         "components have an RMS of 0.2)")
    ap.add_argument("--images", type=int, default=None, help="override the number of images of every scene")
    ap.add_argument("--size", type=str, default=None, help="override the image size of every scene, WxH")
    ap.add_argument("--image-size", type=int, default=None, help="override the network resolution")
    ap.add_argument("--routes", nargs="+", choices=ROUTES + EXTRA_ROUTES, default=list(ROUTES))
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mast3r_colmap_bench_sfm_accuracy")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--json", type=Path, default=None, help="also write every per-seed result here")
    ap.add_argument("--progress", action="store_true", help="show the progress bars of hloc and the mapper")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mast3r_colmap").setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger(accuracy.__name__).setLevel(logging.INFO)
    logging.getLogger("hloc").setLevel(logging.INFO if args.verbose else logging.WARNING)
    pycolmap.logging.minloglevel = 0 if args.verbose else 2
    torch.set_num_threads(args.threads)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    specs = {}
    for name in args.scenes:
        spec = (QUICK if args.quick else SCENES)[name]
        if args.images:
            spec = replace(spec, images=args.images)
        if args.size:
            w, h = (int(v) for v in args.size.lower().split("x"))
            spec = replace(spec, size=(w, h))
        if args.image_size:
            spec = replace(spec, image_size=args.image_size)
        specs[name] = spec
    match_dense = None
    if any(r.startswith("hloc") for r in args.routes):
        if not (HLOC_ROOT / "hloc" / "__init__.py").is_file():
            raise SystemExit(f"hloc's source is not at {HLOC_ROOT}")
        sys.path.insert(0, str(HLOC_ROOT))
        match_dense = accuracy.load_match_dense()
    args.cache.mkdir(parents=True, exist_ok=True)
    mapper_options = {"extract_colors": False}

    started = time.perf_counter()
    tables, records = [], []
    for name, spec in specs.items():
        for noise in args.noise:
            by_route: Dict[str, List[accuracy.RouteResult]] = {r: [] for r in args.routes}
            for seed in seeds:
                for result in run_one(name, spec, noise, seed, args.routes, args.cache, match_dense, mapper_options,
                                      args.progress):
                    by_route[result.route].append(result)
                    records.append({"scene": name, **asdict(spec), "noise": noise, "seed": seed, **result.asdict()})
            w, h = spec.size
            title = (f"{name}: {spec.kind}, {spec.images} images {w}x{h}, `{spec.preset}` at {spec.image_size} px, "
                     f"pairs {spec.pairs}, noise {noise:g}")
            tables.append(table(title, by_route))
            print("\n" + tables[-1] + "\n", flush=True)
    print(f"\nall tables ({time.perf_counter() - started:.0f} s, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} cpus):\n")
    print("\n\n".join(tables))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
