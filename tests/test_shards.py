"""Matching in shards (mast3r_colmap.shards, mast3r_colmap.executors): the cut of the pairs, the shard stores, and
runs in shards (this process, a local Ray cluster with a worker killed mid-shard, torchrun with gloo, `--shard i/N`
commands) whose merged database is identical to the single-process run's: keypoints, matches and two-view
geometries compared array for array.

The workers build their matcher themselves: `synthetic_matcher` (the synthetic scene's oracle in the same Matcher
users run) is the matcher factory the executors get, by pickle for Ray."""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Optional

import mast3r_colmap  # noqa: F401  (first: Pillow before pycolmap)
import numpy as np
import pycolmap
import pytest

from mast3r_colmap.executors import ShardedMatching, match_shard, run_local, torchrun_env
from mast3r_colmap.keypoints import KeypointConfig, consolidate
from mast3r_colmap.lock import database_lock
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.matching.schedule import count_encodings
from mast3r_colmap.pairs import pairs_from_spec
from mast3r_colmap.pipeline import PipelineConfig, default_store_path, reconstruct, remove_run_files
from mast3r_colmap.report import RunReport
from mast3r_colmap.shards import (StoreChain, find_shard_stores, open_shard_stores, parse_shard, partition_pairs,
                                  shard_report, shard_store_path)
from mast3r_colmap.store import MatchStore, config_key
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene

TESTS = Path(__file__).resolve().parent
SCENE = {"num_cameras": 6, "image_size": (256, 192), "seed": 0, "kind": "planes"}
CONFIG = PipelineConfig(pairs="exhaustive", camera_model="PINHOLE", mapper="none", progress=False, focal_prior=False)
NUM_PAIRS = 15


class _DiesOnce(SyntheticNetwork):
    """The oracle, in a process that SIGKILLs itself before its ``after + 1``-th decode (with batch size 1: once
    ``after`` pairs are stored) if it is the first of the whole test to get there (it creates ``marker``)."""

    def __init__(self, scene: SyntheticScene, marker: str, after: int):
        super().__init__(scene)
        self.marker, self.after, self.decoded = marker, after, 0

    def decode(self, enc0, enc1, symmetric=False):
        self.decoded += 1
        if self.decoded > self.after:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass  # a retry, or another shard after the kill: go on
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().decode(enc0, enc1, symmetric)


def synthetic_matcher(images: str, marker: Optional[str] = None, after: int = 0) -> Matcher:
    """The matcher factory of these tests (top level: Ray pickles it to its workers)."""
    scene = SyntheticScene.make(**SCENE)
    network = SyntheticNetwork(scene) if marker is None else _DiesOnce(scene, marker, after)
    return Matcher(network, get_config("default", image_size=128, batch_size=1), image_dir=images)


def database_content(path: Path) -> dict:
    """Everything matching puts into a database, as bytes: cameras, keypoints, matches, two-view geometries."""
    with pycolmap.Database.open(str(path)) as db:
        names = {im.image_id: im.name for im in db.read_all_images()}
        out = {"images": sorted(names.values()),
               "cameras": sorted((c.model.name, c.width, c.height, tuple(c.params)) for c in db.read_all_cameras())}
        for image_id, name in names.items():
            out[f"kp:{name}"] = np.asarray(db.read_keypoints(image_id)).tobytes()
        pair_ids, _ = db.read_num_matches()
        for pid in pair_ids:
            i, j = (int(v) for v in pycolmap.pair_id_to_image_pair(int(pid)))
            key = f"{names[i]}|{names[j]}"
            out[f"m:{key}"] = np.asarray(db.read_matches(i, j)).tobytes()
            tvg = db.read_two_view_geometry(i, j)
            out[f"tvg:{key}"] = (str(tvg.config), np.asarray(tvg.inlier_matches).tobytes(),
                                 np.asarray(tvg.F).tobytes(), np.asarray(tvg.E).tobytes(), np.asarray(tvg.H).tobytes())
    return out


def stored_pairs(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(str(path)) as con:
        return con.execute("SELECT COUNT(*) FROM pair_matches").fetchone()[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The scene's images and the database of the single-process run (the one every sharded run must equal)."""
    pycolmap.logging.minloglevel = 2
    root = tmp_path_factory.mktemp("shards")
    SyntheticScene.make(**SCENE).write_images(root / "images")
    summary = reconstruct(root / "images", root / "ref.db", synthetic_matcher(str(root / "images")), CONFIG)
    assert summary["num_pairs"] == NUM_PAIRS and summary["num_verified_pairs"] == NUM_PAIRS
    return root, database_content(root / "ref.db")


def _merge(root: Path, db: Path, match_shards=None, report=None) -> dict:
    """The merge: the pipeline of one process with the same matcher (plus a hook that matches shards first)."""
    return reconstruct(root / "images", db, synthetic_matcher(str(root / "images")), CONFIG, match_shards=match_shards,
                       report=report)


# ---- the cut -------------------------------------------------------------------------------------


def test_parse_shard():
    assert parse_shard("3/8") == (3, 8) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("8/8", "3", "a/b", "-1/4", "1/0", "1/2/3"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def _ring(n: int, k: int) -> list:
    """Each image with its k successors on a ring (a retrieval-like graph of bandwidth k), listed by name."""
    names = [f"im{i:04d}.jpg" for i in range(n)]
    return sorted({tuple(sorted((names[i], names[(i + d) % n]))) for i in range(n) for d in range(1, k + 1)})


def test_partition_cuts_every_pair_once_by_locality():
    pairs = _ring(400, 10)
    shards = partition_pairs(pairs, 8, cache_size=64)
    assert [s.index for s in shards] == list(range(8)) and {s.count for s in shards} == {8}
    assert sorted(p for s in shards for p in s.pairs) == pairs  # every pair once, orientation kept
    assert {len(s.pairs) for s in shards} == {500}  # 4000 pairs / 8
    assert partition_pairs(pairs, 8, cache_size=64) == shards  # deterministic
    report = shard_report(shards, cache_size=64)
    assert [r["pairs"] for r in report] == [500] * 8
    assert [r["encoder_runs"] for r in report] == [count_encodings(s.pairs, 64) for s in shards]
    # a band of neighbouring images per shard: 400 images in all, 63-77 per shard, 560 encoder runs in all
    # (1.4 per image), where dealing the pairs out in turn makes every shard touch (nearly) every image
    images = [r["images"] for r in report]
    assert max(images) <= 80 and sum(r["encoder_runs"] for r in report) <= 560, report
    dealt = [pairs[i::8] for i in range(8)]
    assert min(len({n for p in d for n in p}) for d in dealt) >= 399
    # uneven counts: sizes differ by at most one, the first shards get the extra pairs; more shards than pairs
    assert [len(s.pairs) for s in partition_pairs(pairs[:11], 4, 64)] == [3, 3, 3, 2]
    assert [len(s.pairs) for s in partition_pairs(pairs[:2], 4, 64)] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="number of shards"):
        partition_pairs(pairs, 0, 64)


def test_shard_store_paths_and_discovery(tmp_path):
    store = tmp_path / "db [1].db.mast3r-matches.sqlite"
    assert shard_store_path(store, 3, 8).name == "db [1].db.mast3r-matches.shard-03-of-08.sqlite"
    assert shard_store_path(store, 7, 120).name == "db [1].db.mast3r-matches.shard-007-of-120.sqlite"
    with pytest.raises(ValueError):
        shard_store_path(store, 8, 8)
    assert find_shard_stores(store) == []
    made = [shard_store_path(store, i, n) for i, n in ((1, 2), (0, 2), (2, 10))]
    for path in made:
        path.write_bytes(b"")
    for other in ("db [1].db.mast3r-matches.shard-00-of-02.sqlite-wal",  # companions, locks, other databases
                  "db [1].db.mast3r-matches.shard-00-of-02.sqlite.lock", "db.db.mast3r-matches.shard-00-of-02.sqlite",
                  "db [1].db.mast3r-matches.shard-x-of-02.sqlite"):
        (tmp_path / other).write_bytes(b"")
    assert find_shard_stores(store) == [made[1], made[0], made[2]]  # by (N, i)


def test_store_chain_any_order_gives_the_same_consolidation(reference, tmp_path):
    """Pairs dealt over three stores, read as one in every order of the stores: the same keypoints and matches
    as from the single store (consolidation does not depend on the order of the pairs)."""
    root, _ = reference
    images = root / "images"
    key = config_key(synthetic_matcher(str(images)).settings())
    pairs = pairs_from_spec("exhaustive", SyntheticScene.make(**SCENE).names)
    with MatchStore(default_store_path(root / "ref.db"), key, images) as ref:
        kp_ref, m_ref = consolidate(ref.get_many(pairs), KeypointConfig())
        stores = [MatchStore(tmp_path / f"s{i}.sqlite", key, images) for i in range(3)]
        for i, pair in enumerate(pairs):
            stores[i * 7 % 3].put(ref.get(*pair))
    stores[2].put(stores[0].get(*pairs[0]))  # a pair held twice: read once, from the first store holding it
    try:
        for order in itertools.permutations(stores):
            chain = StoreChain(order)
            assert len(chain.done_pairs()) == NUM_PAIRS
            kp, m = consolidate(chain.get_many(pairs), KeypointConfig())
            assert kp.keys() == kp_ref.keys()
            for name in kp_ref:
                np.testing.assert_array_equal(kp[name].keypoints, kp_ref[name].keypoints)
                np.testing.assert_array_equal(kp[name].scores, kp_ref[name].scores)
            by_pair = {(x.name0, x.name1): x for x in m}
            assert len(by_pair) == len(m_ref)
            for x in m_ref:
                np.testing.assert_array_equal(by_pair[x.name0, x.name1].matches, x.matches)
                np.testing.assert_array_equal(by_pair[x.name0, x.name1].scores, x.scores)
        with pytest.raises(KeyError):
            list(StoreChain(stores[:1]).get_many(pairs))
    finally:
        for store in stores:
            store.close()


# ---- sharded runs: identical databases ---------------------------------------------------------------------


def test_local_shards_then_merge(reference, tmp_path):
    root, expected = reference
    db = tmp_path / "db.db"
    hook = ShardedMatching(functools.partial(synthetic_matcher, str(root / "images")), 3, "local", cache_size=4,
                           progress=False)
    summary = _merge(root, db, hook)
    assert summary["num_verified_pairs"] == NUM_PAIRS
    assert [r.num_pairs for r in hook.results] == [5, 5, 5] and [r.matched for r in hook.results] == [5, 5, 5]
    assert [r["pairs"] for r in hook.report] == [5, 5, 5]
    assert [stored_pairs(Path(r.store)) for r in hook.results] == [5, 5, 5]
    assert stored_pairs(default_store_path(db)) == 0  # the merge matched nothing itself
    assert database_content(db) == expected
    # --overwrite removes the shard stores with the database and the run's store
    removed = remove_run_files(db)
    assert find_shard_stores(default_store_path(db)) == [] and db not in tmp_path.iterdir() and removed


def test_shard_commands_then_merge_matches_what_is_missing(reference, tmp_path):
    """`--shard i/N` runs write their shard stores only; shard 1 of 3 never ran: the merge (no shards) matches its
    pairs into the run's store, then writes a database identical to the single-process run's."""
    root, expected = reference
    db = tmp_path / "db.db"
    factory = functools.partial(synthetic_matcher, str(root / "images"))
    shards = partition_pairs(pairs_from_spec("exhaustive", SyntheticScene.make(**SCENE).names), 3, 4)
    results = run_local([shards[0], shards[2]], factory, default_store_path(db))
    assert [(r.index, r.matched) for r in results] == [(0, 5), (2, 5)] and not db.exists()
    again = match_shard(shards[0], factory, default_store_path(db))  # a re-run of a finished shard: nothing to do
    assert (again.stored_before, again.matched) == (5, 0)
    fresh = match_shard(shards[2], factory, default_store_path(db), fresh=True)  # --shard 2/3 --overwrite
    assert (fresh.stored_before, fresh.matched) == (0, 5)
    _merge(root, db)
    assert stored_pairs(default_store_path(db)) == 5  # shard 1's pairs, matched by the merge
    assert database_content(db) == expected


def test_sharded_rerun_gives_the_shards_only_what_no_store_holds(reference, tmp_path):
    """After a sharded run that stopped with one shard of 3 done, a run with 2 shards cuts only the 10 pairs left."""
    root, expected = reference
    db = tmp_path / "db.db"
    factory = functools.partial(synthetic_matcher, str(root / "images"))
    first = partition_pairs(pairs_from_spec("exhaustive", SyntheticScene.make(**SCENE).names), 3, 4)
    run_local(first[:1], factory, default_store_path(db))
    hook = ShardedMatching(factory, 2, "local", cache_size=4, progress=False)
    report = RunReport()
    _merge(root, db, hook, report)
    assert [(r.num_pairs, r.stored_before, r.matched) for r in hook.results] == [(5, 0, 5), (5, 0, 5)]
    assert stored_pairs(default_store_path(db)) == 0
    # the report counts what the shard workers matched in this run (the pairs of the earlier shard: from a store)
    counts = report.to_dict()["counts"]
    assert (counts["pairs_matched"], counts["pairs_from_store"]) == (10, 5)
    assert counts["encoder_runs"] == sum(r.encoder_runs for r in hook.results) > 0
    assert counts["pairs_per_s"] == pytest.approx(10 / report.seconds("matching"))
    assert database_content(db) == expected


def test_shard_in_use_is_refused(reference, tmp_path):
    """A shard store whose worker still runs (it holds the lock) is neither merged nor matched by a second worker."""
    root, _ = reference
    db = tmp_path / "db.db"
    factory = functools.partial(synthetic_matcher, str(root / "images"))
    shards = partition_pairs(pairs_from_spec("exhaustive", SyntheticScene.make(**SCENE).names), 2, 4)
    path = shard_store_path(default_store_path(db), 0, 2)
    path.write_bytes(b"")
    errors = []
    with database_lock(path):  # held by this thread: another thread (another worker) is refused
        thread = threading.Thread(target=lambda: errors.extend(_raises(match_shard, shards[0], factory,
                                                                       default_store_path(db))))
        thread.start()
        thread.join()
        thread = threading.Thread(target=lambda: errors.extend(_raises(_enter, open_shard_stores(
            default_store_path(db), "k"))))
        thread.start()
        thread.join()
    assert len(errors) == 2 and "in use" in errors[0] and "still being matched" in errors[1], errors


def _raises(fn, *args) -> list:
    try:
        fn(*args)
    except ValueError as exc:
        return [str(exc)]
    return []


def _enter(context) -> None:
    with context:
        pass


def test_ray_cluster_with_a_worker_killed_mid_shard(reference, tmp_path, monkeypatch):
    """A local Ray cluster of 2 workers, 4 shards: the first worker to match its 3rd pair dies (SIGKILL); Ray
    retries its task, which resumes from the shard's store (2 pairs there) and matches only the rest."""
    import ray  # the test extra has it
    root, expected = reference
    db = tmp_path / "db.db"
    factory = functools.partial(synthetic_matcher, str(root / "images"), str(tmp_path / "killed"), 2)
    # the workers (started by ray.init, with its environment) import this module to unpickle the factory
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        hook = ShardedMatching(factory, 4, "ray", cache_size=4, progress=False, gpus_per_shard=0)
        _merge(root, db, hook)
    finally:
        ray.shutdown()
    assert (tmp_path / "killed").exists()
    runs = sorted((r.index, r.num_pairs, r.stored_before, r.matched) for r in hook.results)
    assert [r[:2] for r in runs] == [(0, 4), (1, 4), (2, 4), (3, 3)]
    retried = [r for r in runs if r[2]]
    assert len(retried) == 1 and retried[0][2:] == (2, retried[0][1] - 2), runs  # 2 kept, only the rest matched
    assert all(r[3] == r[1] for r in runs if not r[2])
    assert [stored_pairs(shard_store_path(default_store_path(db), i, 4)) for i in range(4)] == [4, 4, 4, 3]
    assert stored_pairs(default_store_path(db)) == 0
    assert database_content(db) == expected


_TORCHRUN_SCRIPT = textwrap.dedent("""
    import functools, json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import test_shards as t  # mast3r_colmap before pycolmap
    from mast3r_colmap.executors import TorchrunMatching, process_group, torchrun_env
    from mast3r_colmap.pipeline import reconstruct

    root, db = Path(sys.argv[2]), Path(sys.argv[3])
    rank, world, _ = torchrun_env()
    factory = functools.partial(t.synthetic_matcher, str(root / "images"))
    with process_group():
        hook = TorchrunMatching(factory, rank, world, cache_size=4, progress=False)
        if rank == 0:
            try:
                reconstruct(root / "images", db, factory(), t.CONFIG, match_shards=hook)
            finally:
                hook.close()
            print(json.dumps([r.as_dict() for r in hook.results]))
        else:
            hook.follow()
""")


def test_torchrun_two_ranks(reference, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): each rank matches its shard, rank 0 waits for the other and merges."""
    root, expected = reference
    script = tmp_path / "run.py"
    script.write_text(_TORCHRUN_SCRIPT)
    db = tmp_path / "db.db"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(TESTS), str(root), str(db)],
                         capture_output=True, text=True, timeout=300, env=dict(env, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert [(r["shard"], r["num_pairs"], r["matched"]) for r in results] == [("0/2", 8, 8), ("1/2", 7, 7)]
    assert stored_pairs(default_store_path(db)) == 0
    assert database_content(db) == expected


def test_torchrun_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert torchrun_env() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert torchrun_env() == (1, 4, 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert torchrun_env() == (1, 4, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert torchrun_env() is None  # a world of one is a run of one process
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="RANK"):
        torchrun_env()


# ---- the command line ------------------------------------------------------------------------------


def test_cli_shard_runs_then_merge(images, small_pth, tmp_path, caplog, capsys, presets_at_256):
    """`--shard 0/2` and `--shard 1/2` (the test checkpoint, two photos: one pair) fill their shard stores only; the
    same command without --shard merges them into a database identical to the run of one process."""
    from conftest import run_main

    common = ["--checkpoint", small_pth, "--mapper", "none", "--batch-size", "1", "--no-focal-prior",
              "--verification-options", "ransac.max_num_trials=1000"]
    assert run_main([images, tmp_path / "ref.db", *common], caplog)[0] == 0
    db = tmp_path / "db.db"
    capsys.readouterr()
    done = []
    for shard in ("1/2", "0/2"):
        code, log = run_main([images, db, *common, "--shard", shard], caplog)
        assert code == 0, log
        done.append(json.loads(capsys.readouterr().out)["matched"])
    assert sorted(done) == [0, 1] and not db.exists()  # the shards wrote their stores only
    assert sorted(stored_pairs(p) for p in find_shard_stores(default_store_path(db))) == [1]  # the empty shard: none
    code, log = run_main([images, db, *common], caplog)
    assert code == 0 and "matching: 0 pairs to do" in log, log
    assert database_content(db) == database_content(tmp_path / "ref.db")


@pytest.mark.parametrize("flags, message", [
    (["--shard", "2/2"], "0 <= I < N"),
    (["--shard", "x"], "expected I/N"),
    (["--shard", "0/2", "--executor", "ray"], "not with --executor ray"),
    (["--executor", "ray", "--gpus-per-shard", "-1"], "--gpus-per-shard must be >= 0"),
])
def test_cli_bad_shard_flags(images, tmp_path, caplog, flags, message):
    from conftest import run_main

    from mast3r_colmap.run import EXIT_BAD_INPUT

    code, log = run_main([images, tmp_path / "db.db", "--checkpoint", tmp_path / "unused.pth", *flags], caplog)
    assert code == EXIT_BAD_INPUT and message in log and "Traceback" not in log, log
    assert list(tmp_path.iterdir()) == [images]
