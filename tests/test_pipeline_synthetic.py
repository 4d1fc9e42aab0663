"""End to end on a synthetic scene with known geometry: the scene's oracle stands in for the network in the
same Matcher (image loading, encoding cache, batching, FRM, filters, coarse-to-fine) and feeds the same
consolidation, database, verification and mapping code that users run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from mast3r_colmap import mapping
from mast3r_colmap.export import hloc_h5
from mast3r_colmap.keypoints import KeypointConfig
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.pairs import read_pairs
from mast3r_colmap.pipeline import PipelineConfig, default_store_path, reconstruct
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene, pose_errors

MAX_ROTATION_DEG = 0.5
MAX_CENTER_REL = 0.01  # of the scene size


def _check_poses(rec: pycolmap.Reconstruction, scene: SyntheticScene) -> dict:
    err = pose_errors(rec, scene)
    assert err["unregistered"] == [], f"unregistered: {err['unregistered']}"
    assert len(err["registered"]) == len(scene.names) >= 8
    assert err["max_rotation_deg"] < MAX_ROTATION_DEG, err["rotation_deg"]
    assert err["max_center_rel"] < MAX_CENTER_REL, err["center_rel"]
    return err


@pytest.fixture(scope="module")
def scene_run(tmp_path_factory):
    """8 pictures of 320x240 matched at 160 px: the pictures are halved for the network, as the real photos are
    (at 640x480 / 320 px every test here takes 4-6x as long, with errors of 0.03 instead of 0.07-0.08 degrees and
    1.2e-4 instead of 3e-4 of the scene size: both far within the bounds, which catch wrong geometry)."""
    pycolmap.logging.minloglevel = 2
    scene = SyntheticScene.make(num_cameras=8, image_size=(320, 240), seed=0, kind="planes")
    root = tmp_path_factory.mktemp("scene")
    scene.write_images(root / "images")
    matcher = Matcher(SyntheticNetwork(scene), get_config("default", image_size=160), image_dir=root / "images")
    config = PipelineConfig(pairs="sequential:3", camera_model="PINHOLE", progress=False)
    result = reconstruct(root / "images", root / "database.db", matcher, config,
                         output_dir=root / "sparse", export_h5=root / "h5")
    return scene, root, result, matcher.settings()


def test_database_route(scene_run):
    scene, root, result, _ = scene_run
    assert result["num_images"] == 8 and result["num_pairs"] == 18
    assert result["num_registered_images"] == 8
    assert result["mean_reprojection_error"] < 1.5
    rec = pycolmap.Reconstruction(str(root / "sparse"))
    _check_poses(rec, scene)
    summary = json.loads((root / "sparse" / "summary.json").read_text())
    assert summary["num_registered_images"] == 8 and summary["num_points3D"] == rec.num_points3D()
    with pycolmap.Database.open(str(root / "database.db")) as db:
        ids = {im.name: im.image_id for im in db.read_all_images()}
        for n0, n1 in read_pairs(root / "h5" / "pairs.txt"):
            tvg = db.read_two_view_geometry(ids[n0], ids[n1])
            assert tvg.config != pycolmap.TwoViewGeometryConfiguration.UNDEFINED
            assert len(tvg.inlier_matches) > 100


def test_hloc_h5_route(scene_run, tmp_path):
    """The exported features.h5 / matches.h5 / pairs.txt, imported the way hloc's reconstruction does."""
    scene, root, _, _ = scene_run
    h5 = root / "h5"
    db_path = tmp_path / "hloc.db"
    with pycolmap.Database.open(str(db_path)):  # hloc's create_empty_db
        pass
    pycolmap.import_images(str(db_path), str(root / "images"), pycolmap.CameraMode.SINGLE,
                           options=pycolmap.ImageReaderOptions(camera_model="PINHOLE"))
    features = hloc_h5.read_features(h5 / "features.h5")
    pairs = read_pairs(h5 / "pairs.txt")
    with pycolmap.Database.open(str(db_path)) as db:
        ids = {im.name: im.image_id for im in db.read_all_images()}
        assert set(features) == set(ids)
        for name, kp in features.items():
            assert kp.keypoints.dtype == np.float64  # read back from float32 storage
            db.write_keypoints(ids[name], (kp.keypoints + 0.5).astype(np.float32))  # hloc's +0.5
        for n0, n1 in pairs:
            m = hloc_h5.read_matches(h5 / "matches.h5", n0, n1)
            db.write_matches(ids[n0], ids[n1], m.matches.astype(np.uint32))
    pycolmap.verify_matches(str(db_path), str(h5 / "pairs.txt"))
    rec = mapping.incremental(db_path, root / "images", tmp_path / "sparse")
    assert rec is not None
    _check_poses(rec, scene)


@pytest.mark.slow
def test_global_mapping(scene_run, tmp_path):
    scene, root, _, _ = scene_run
    db = tmp_path / "database.db"
    db.write_bytes((root / "database.db").read_bytes())
    rec = mapping.global_mapping(db, root / "images", tmp_path / "sparse")
    assert rec is not None
    _check_poses(rec, scene)


@pytest.mark.slow
def test_hires_end_to_end(tmp_path):
    """Coarse-to-fine end to end: 256x192 pictures matched at 128 px, refined with full-resolution crops.

    With one keypoint per pixel (``cell_size=1``) the keypoints keep the full-resolution accuracy of the
    fine matches: reprojection and rotation errors are about half of what the 128-px matches alone give
    (0.45 px, 0.14-0.44 degrees on these scenes).
    """
    pycolmap.logging.minloglevel = 2
    scene = SyntheticScene.make(num_cameras=8, image_size=(256, 192), seed=0, kind="planes")
    scene.write_images(tmp_path / "images")
    network = SyntheticNetwork(scene)
    matcher = Matcher(network, get_config("hires", image_size=128), image_dir=tmp_path / "images")
    config = PipelineConfig(pairs="sequential:2", camera_model="PINHOLE", keypoints=KeypointConfig(cell_size=1),
                            progress=False)
    result = reconstruct(tmp_path / "images", tmp_path / "database.db", matcher, config,
                         output_dir=tmp_path / "sparse")
    crops = [key for key in network.encoded if key[1] is not None]
    assert len(crops) > 50 and len(set(network.encoded)) == len(network.encoded)  # each crop encoded once
    assert all((r - l, b - t) == (128, 96) for _, (l, t, r, b) in crops)
    assert result["mean_reprojection_error"] < 0.3
    err = _check_poses(pycolmap.Reconstruction(str(tmp_path / "sparse")), scene)
    assert err["max_rotation_deg"] < 0.15, err["rotation_deg"]


class _NoMatching:
    def __init__(self, settings):
        self._settings = settings

    def settings(self):
        return self._settings

    def match_pairs(self, pairs):
        pairs = list(pairs)
        assert not pairs, f"re-run matched {len(pairs)} pairs again"
        return iter(())


def test_rerun_reuses_database(scene_run):
    """Re-running on the finished database reuses images and keypoints and matches nothing."""
    scene, root, _, settings = scene_run
    with pycolmap.Database.open(str(root / "database.db")) as db:
        before = (db.num_images(), db.num_keypoints(), db.num_matches(), db.num_inlier_matches())
    config = PipelineConfig(pairs="sequential:3", camera_model="PINHOLE", progress=False, mapper="none")
    result = reconstruct(root / "images", root / "database.db", _NoMatching(settings), config)
    assert result["num_pairs"] == 18
    with pycolmap.Database.open(str(root / "database.db")) as db:
        assert (db.num_images(), db.num_keypoints(), db.num_matches(), db.num_inlier_matches()) == before


# ---- resume after kill -9 -------------------------------------------------------------------------

class _SlowNetwork(SyntheticNetwork):
    def __init__(self, scene: SyntheticScene, delay: float):
        super().__init__(scene)
        self.delay = delay

    def decode(self, enc0, enc1, symmetric=False):
        time.sleep(self.delay * len(enc0))
        return super().decode(enc0, enc1, symmetric)


_RESUME_SCENE = {"num_cameras": 5, "image_size": (320, 240), "seed": 3, "kind": "planes"}


def _resume_run(root: Path, db: Path, delay: float) -> None:
    """The run of the resume test: 5 pictures, 10 pairs matched one at a time, ``delay`` s per pair."""
    pycolmap.logging.minloglevel = 2
    scene = SyntheticScene.make(**_RESUME_SCENE)
    if not (root / "images").exists():
        scene.write_images(root / "images")
    matcher = Matcher(_SlowNetwork(scene, delay), {"image_size": 160, "batch_size": 1}, image_dir=root / "images")
    config = PipelineConfig(pairs="exhaustive", camera_model="PINHOLE", mapper="none", progress=False)
    reconstruct(root / "images", db, matcher, config)


#: The run killed with SIGKILL: a process of its own (this module's run, imported from the tests folder).
_RUN_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    import mast3r_colmap  # before pycolmap (see mast3r_colmap/__init__.py)
    from test_pipeline_synthetic import _resume_run

    _resume_run(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]))
""")


def _database_content(path: Path) -> dict:
    with pycolmap.Database.open(str(path)) as db:
        ids = {im.image_id: im.name for im in db.read_all_images()}
        out = {"images": sorted(ids.values()), "cameras": db.num_cameras()}
        for image_id, name in ids.items():
            out[f"kp:{name}"] = np.asarray(db.read_keypoints(image_id)).tobytes()
        pair_ids, _ = db.read_num_matches()
        for pid in pair_ids:
            i, j = pycolmap.pair_id_to_image_pair(int(pid))
            key = f"{ids[int(i)]}|{ids[int(j)]}"
            out[f"m:{key}"] = np.asarray(db.read_matches(int(i), int(j))).tobytes()
            tvg = db.read_two_view_geometry(int(i), int(j))
            out[f"tvg:{key}"] = (str(tvg.config), len(tvg.inlier_matches))
        return out


@pytest.mark.slow
def test_resume_after_kill(tmp_path):
    """A run killed with SIGKILL once a few pairs are stored, started again, ends with the database of an
    uninterrupted run (the reference and the restart run in this process: only the killed run needs its own)."""
    script = tmp_path / "run.py"
    script.write_text(_RUN_SCRIPT)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    SyntheticScene.make(**_RESUME_SCENE).write_images(tmp_path / "images")
    db = tmp_path / "killed.db"
    store = default_store_path(db)
    with ThreadPoolExecutor(1) as pool:
        # the uninterrupted reference run, in a thread while the other process starts (its own database and store)
        reference = pool.submit(_resume_run, tmp_path, tmp_path / "ref.db", 0.0)
        # a run killed with SIGKILL once a few pairs are stored
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(db), "0.7",
                                 str(Path(__file__).parent)], env=env)
        stored = 0
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if store.exists():
                try:
                    with sqlite3.connect(str(store)) as con:
                        stored = con.execute("SELECT COUNT(*) FROM pair_matches").fetchone()[0]
                except sqlite3.Error:
                    continue
                if stored >= 3:
                    break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reference.result()
    assert 3 <= stored < 10, f"kill came too late or too early ({stored} pairs stored)"
    with pycolmap.Database.open(str(db)) as d:
        assert d.num_matches() == 0  # nothing half-written: matches go in at the end, in one transaction
    # start again: it continues where it stopped
    _resume_run(tmp_path, db, 0.0)
    with sqlite3.connect(str(store)) as con:
        assert con.execute("SELECT COUNT(*) FROM pair_matches").fetchone()[0] == 10
    assert _database_content(db) == _database_content(tmp_path / "ref.db")
