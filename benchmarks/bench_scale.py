"""Consolidation + database write at scale: in memory (``keypoints.consolidate``) vs out of core
(``keypoints.consolidate_out_of_core``, what ``match_into_database`` runs), peak RSS and time.

    python benchmarks/bench_scale.py [--images 1000,5000,10000] [--matches 2000,20000] [--neighbours 10]
                                     [--workdir /tmp/bench_scale] [--max-rss-gb 20] [--max-minutes 30]

For each size, synthetic raw matches are written straight into a match store in ``--workdir`` (deleted after
its runs unless ``--keep-stores``: the store of 10k images x 20 000 matches takes 20 GB; a kept one is reused): a random pair graph with ``--neighbours`` pairs per image on average (``images * neighbours /
2`` pairs), 1600x1200 images matched at 512 px, every match on the network pixels of both images (their
sampling grids, 3.125 px apart; float32 coordinates as the store keeps them), scores uniform in [1, 10). Then
each method runs in a fresh subprocess, as the pipeline runs it: the store's pairs consolidated (default
``KeypointConfig``, no cap on keypoints per image), the keypoints and matches written into a COLMAP
database that holds the images (one transaction), their scores recorded beside it. Each subprocess reports its
peak RSS (``VmHWM`` of ``/proc/self/status``; "RSS before": its peak before consolidation, with the modules
imported and the store open), the seconds of consolidation and of the database write, and the size of the
scratch files (out of core) and of the database.

In memory runs first and is the baseline. A run whose peak RSS, extrapolated linearly in the number of raw
matches from the smaller sizes of the same method, would exceed ``--max-rss-gb`` (or 90% of the memory
available now), whose time would exceed ``--max-minutes``, or whose files (store, scratch, database; from the
smaller sizes) would need more than ``--max-disk-gb`` or 80% of the free disk, is skipped with a note. Last, the verifier's
estimator is timed on synthetic pairs with the mean number of one-to-one matches per pair of each run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from mast3r_colmap.export import colmap_db, scores
from mast3r_colmap.keypoints import KeypointConfig, consolidate, consolidate_out_of_core
from mast3r_colmap.store import MatchStore
from mast3r_colmap.structures import PairMatches, SamplingGrid

import pycolmap  # noqa: E402  (after mast3r_colmap)

STEP = 1600 / 512
GRID = SamplingGrid(0.5 * STEP - 0.5, 0.5 * STEP - 0.5, STEP, STEP)   # the network pixels of a 512-px pass
CONFIG = "bench-scale"


def names_of(n_images: int) -> List[str]:
    return [f"{i:06d}.jpg" for i in range(n_images)]


def pair_graph(n_images: int, neighbours: int, seed: int = 0) -> List[Tuple[int, int]]:
    """``n_images * neighbours / 2`` distinct random pairs (i < j)."""
    rng = np.random.default_rng(seed)
    want = n_images * neighbours // 2
    links: set = set()
    while len(links) < want:
        ij = rng.integers(0, n_images, (want - len(links), 2))
        ij = ij[ij[:, 0] != ij[:, 1]]
        links.update(zip(np.minimum(ij[:, 0], ij[:, 1]).tolist(), np.maximum(ij[:, 0], ij[:, 1]).tolist()))
    return sorted(links)[:want]


def make_store(path: Path, n_images: int, neighbours: int, matches: int) -> Dict[str, float]:
    """Write the synthetic matches into a store at ``path`` (reused when complete); returns its numbers."""
    names = names_of(n_images)
    links = pair_graph(n_images, neighbours)
    done = path.with_suffix(".done")
    t0 = time.perf_counter()
    if not done.is_file():
        for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            file.unlink(missing_ok=True)
        rng = np.random.default_rng(1)
        with MatchStore(path, CONFIG) as store:
            for k, (i, j) in enumerate(links):
                xy = [((np.stack([rng.integers(3, 509, matches), rng.integers(3, 381, matches)], 1) + 0.5) * STEP
                       - 0.5).astype(np.float32) for _ in range(2)]
                store.put(PairMatches(names[i], names[j], xy[0], xy[1], rng.uniform(1, 10, matches), GRID, GRID))
                if k % 5000 == 4999:
                    print(f"  store: {k + 1}/{len(links)} pairs", file=sys.stderr, flush=True)
        done.write_text(str(len(links)))
    return {"pairs": len(links), "store_gb": path.stat().st_size / 1e9, "store_s": time.perf_counter() - t0}


def make_database(path: Path, n_images: int) -> Dict[str, int]:
    """A COLMAP database with one camera and the images (no keypoints yet); returns ``{name: image_id}``."""
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        file.unlink(missing_ok=True)
    ids = {}
    with pycolmap.Database.open(str(path)) as db, pycolmap.DatabaseTransaction(db):
        camera = db.write_camera(pycolmap.Camera.create_from_model_name(0, "SIMPLE_RADIAL", 1920.0, 1600, 1200))
        for name in names_of(n_images):
            ids[name] = int(db.write_image(pycolmap.Image(name=name, camera_id=camera)))
    return ids


def _rss_peak_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(method: str, store_path: Path, db_path: Path, n_images: int) -> None:
    """One measured run (in its own process): consolidation + database write, as the pipeline does them."""
    ids = make_database(db_path, n_images)
    conf = KeypointConfig()
    with MatchStore(store_path, CONFIG, read_only=True) as store:
        pairs = sorted(tuple(sorted(p)) for p in store.done_pairs())
        base = _rss_peak_gb()
        t0 = time.perf_counter()
        if method == "memory":
            kps, matches = consolidate(store.get_many(pairs), conf)
            t1 = time.perf_counter()
            colmap_db.write_features_and_matches(db_path, ids, kps, matches)
            scores.record(db_path, ids, kps, matches)
            n_kps, n_matches = sum(len(k) for k in kps.values()), sum(len(m) for m in matches)
            scratch_gb = 0.0
        else:
            scratch = db_path.with_name(db_path.name + ".mast3r-consolidation")
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            with consolidate_out_of_core(pairs, lambda ix: store.get_many([pairs[i] for i in ix]), conf,
                                         workdir=scratch) as result:
                t1 = time.perf_counter()
                colmap_db.write_features_and_matches(db_path, ids, result.keypoints, result.matches())
                scores.record(db_path, ids, result.keypoints, result.matches())
                n_kps, n_matches = sum(result.num_keypoints.values()), sum(result.match_counts)
                # the scratch files at their largest (the end of pass 2): per raw match 12 bytes, per keypoint 20,
                # per one-to-one match 12 (nothing is filtered here)
                scratch_gb = (12 * sum(result.raw_counts) + 20 * n_kps + 12 * n_matches) / 1e9
            scratch.rmdir()
        t2 = time.perf_counter()
    print(json.dumps({"consolidation_s": t1 - t0, "write_s": t2 - t1, "peak_gb": _rss_peak_gb(), "base_gb": base,
                      "keypoints": n_kps, "matches": n_matches, "db_gb": db_path.stat().st_size / 1e9,
                      "scratch_gb": scratch_gb}))


def time_verification(n_pairs: int, matches: int, outliers: float = 0.25, seed: int = 0) -> Dict[str, float]:
    """Seconds per pair of ``pycolmap.estimate_two_view_geometry`` (the verifier's estimator, its default options)
    on one thread: two 1600x1200 views of random points 4-20 focal lengths away, 1 m apart, ``matches`` keypoint
    matches with 0.5 px noise, ``outliers`` of them random."""
    from mast3r_colmap.verification import verification_options

    rng = np.random.default_rng(seed)
    camera = pycolmap.Camera.create_from_model_name(0, "SIMPLE_RADIAL", 1920.0, 1600, 1200)
    options = verification_options(None)
    k = np.array([[1920.0, 0, 800], [0, 1920.0, 600], [0, 0, 1]])
    total, inliers = 0.0, 0
    for _ in range(n_pairs):
        pts = np.stack([rng.uniform(-4, 4, 4 * matches), rng.uniform(-3, 3, 4 * matches),
                        rng.uniform(4, 20, 4 * matches)], 1)
        angle = rng.uniform(-0.2, 0.2)
        rot = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
        views = []
        for r, t in ((np.eye(3), np.zeros(3)), (rot, np.array([1.0, 0.0, 0.0]))):
            cam = pts @ r.T + t
            uv = cam @ k.T
            views.append(uv[:, :2] / uv[:, 2:] + rng.normal(0, 0.5, (len(pts), 2)))
        inside = np.all([(v[:, 0] > 0) & (v[:, 0] < 1600) & (v[:, 1] > 0) & (v[:, 1] < 1200) for v in views], 0)
        xy0, xy1 = (v[inside][:matches] for v in views)
        bad = rng.random(len(xy0)) < outliers
        xy1[bad] = rng.uniform([0, 0], [1600, 1200], (int(bad.sum()), 2))
        idx = np.repeat(np.arange(len(xy0), dtype=np.uint32)[:, None], 2, 1)
        t0 = time.perf_counter()
        tvg = pycolmap.estimate_two_view_geometry(camera, xy0, camera, xy1, idx, options)
        total += time.perf_counter() - t0
        inliers += len(tvg.inlier_matches)
    return {"s_per_pair": total / n_pairs, "inliers_per_pair": inliers / n_pairs}


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("inf")


def _extrapolate(points: List[Tuple[float, float]], x: float) -> Optional[float]:
    """Linear fit through the (raw matches, value) points of the smaller sizes, at ``x``."""
    if not points:
        return None
    xs, ys = np.array(points, float).T / [[1e9], [1]]
    if len(set(xs.tolist())) == 1:                  # one size: proportional, from its largest value
        return float(ys.max() * x / 1e9 / xs[0])
    slope, offset = np.polyfit(xs, ys, 1)
    return float(max(slope * x / 1e9 + offset, ys.max()))


def _row(n: int, pairs: int, m: int, method: str, text: str) -> str:
    return f"{n:7d} {pairs:7d} {m:12d} {pairs * m:12d} {method:>12} {text}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="1000,5000,10000")
    ap.add_argument("--matches", default="2000,20000")
    ap.add_argument("--neighbours", type=int, default=10)
    ap.add_argument("--methods", default="memory,out-of-core")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_scale"))
    ap.add_argument("--max-rss-gb", type=float, default=20.0)
    ap.add_argument("--max-minutes", type=float, default=30.0)
    ap.add_argument("--max-disk-gb", type=float, default=50.0, help="disk for one size's files at most")
    ap.add_argument("--keep-stores", action="store_true", help="keep the stores for later runs")
    ap.add_argument("--verification-pairs", type=int, default=50, help="pairs for the verification timing (0: none)")
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "STORE", "DB", "IMAGES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, store, db, n = args.child
        child(method, Path(store), Path(db), int(n))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    methods = args.methods.split(",")
    rows: List[dict] = []
    seen: Dict[Tuple[str, int], List[Tuple[float, float, float]]] = {}
    files: Dict[int, List[Tuple[float, float]]] = {}     # per matches/pair: (raw, GB of scratch + database)
    print(f"{'images':>7} {'pairs':>7} {'matches/pair':>12} {'raw matches':>12} {'method':>12} {'peak RSS GB':>11} "
          f"{'consolidation s':>15} {'db write s':>10} {'total s':>8} {'us/match':>8} {'store GB':>8} "
          f"{'scratch GB':>10} {'db GB':>6} {'RSS before GB':>13} {'keypoints/image':>15} {'matches/pair':>12}",
          flush=True)
    for m in (int(v) for v in args.matches.split(",")):
        for n in (int(v) for v in args.images.split(",")):
            pairs = n * args.neighbours // 2
            raw = pairs * m
            store = args.workdir / f"store-{n}x{args.neighbours}x{m}.sqlite"
            disk = 20.2e-9 * raw * (0 if store.with_suffix(".done").is_file() else 1) + (
                _extrapolate(files.get(m, []), raw) or 2 * 20.2e-9 * raw)
            free = shutil.disk_usage(args.workdir).free / 1e9
            if disk > min(0.8 * free, args.max_disk_gb):
                note = (f"skipped: its files would need ~{disk:.0f} GB of disk ({free:.0f} GB free, limit "
                        f"{args.max_disk_gb:.0f} GB)")
                print(_row(n, pairs, m, "both", note), flush=True)
                rows.append({"images": n, "pairs": pairs, "matches_per_pair": m, "method": "both", "note": note})
                continue
            made = make_store(store, n, args.neighbours, m)
            for method in methods:
                history = seen.setdefault((method, m), [])
                rss = _extrapolate([(x, p) for x, p, _ in history], raw)
                minutes = _extrapolate([(x, t / 60) for x, _, t in history], raw)
                limit = min(args.max_rss_gb, 0.9 * _available_gb())
                note = None
                if rss is not None and rss > limit:
                    note = f"skipped: would need ~{rss:.1f} GB (limit {limit:.1f} GB)"
                elif minutes is not None and minutes > args.max_minutes:
                    note = f"skipped: would take ~{minutes:.0f} min (limit {args.max_minutes:.0f} min)"
                if note:
                    print(_row(n, pairs, m, method, note), flush=True)
                    rows.append({"images": n, "pairs": pairs, "matches_per_pair": m, "method": method, "note": note})
                    continue
                db = args.workdir / f"bench-{method}.db"
                out = subprocess.run([sys.executable, __file__, "--child", method, str(store), str(db), str(n)],
                                     check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                total = r["consolidation_s"] + r["write_s"]
                history.append((raw, r["peak_gb"], total))
                files.setdefault(m, []).append((raw, r["scratch_gb"] + r["db_gb"]))
                rows.append({"images": n, "pairs": pairs, "matches_per_pair": m, "method": method,
                             "store_gb": made["store_gb"], **r})
                print(_row(n, pairs, m, method, f"{r['peak_gb']:11.2f} {r['consolidation_s']:15.1f} "
                           f"{r['write_s']:10.1f} {total:8.1f} {1e6 * total / raw:8.2f} {made['store_gb']:8.2f} "
                           f"{r['scratch_gb']:10.2f} {r['db_gb']:6.2f} {r['base_gb']:13.2f} "
                           f"{r['keypoints'] / n:15.0f} {r['matches'] / pairs:12.0f}"), flush=True)
                for file in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                    file.unlink(missing_ok=True)
            if not args.keep_stores:
                for file in (store, store.with_suffix(".done"), Path(f"{store}-wal"), Path(f"{store}-shm")):
                    file.unlink(missing_ok=True)
    if args.verification_pairs:
        for m in (int(v) for v in args.matches.split(",")):
            done = [r for r in rows if r.get("matches_per_pair") == m and "matches" in r]
            k = int(round(done[-1]["matches"] / done[-1]["pairs"])) if done else m
            v = time_verification(args.verification_pairs, k)
            rows.append({"verification_matches": k, **v})
            print(f"verification (one thread, {k} matches per pair as consolidated from {m} raw, 25% outliers): "
                  f"{1e3 * v['s_per_pair']:.0f} ms per pair, {v['inliers_per_pair']:.0f} inliers", flush=True)
    (args.workdir / "bench_scale.json").write_text(json.dumps(rows, indent=1))
    print(f"wall time {time.perf_counter() - started:.0f} s; rows in {args.workdir / 'bench_scale.json'}")


if __name__ == "__main__":
    main()
