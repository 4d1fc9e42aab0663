"""The run report (``report.json``): the collector itself, the report of a real command-line run on a
synthetic scene (the scene's oracle stands in for the network), a failed run's report, and the progress of
incremental mapping through pycolmap's registration callbacks."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mast3r_colmap  # noqa: F401  (before pycolmap: see mast3r_colmap/__init__.py)
import numpy as np
import pycolmap
import pytest
import torch

from mast3r_colmap import mapping, report as report_mod
from mast3r_colmap.keypoints import KeypointConfig
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.report import HISTOGRAM_EDGES, RunReport, histogram, jsonable
from mast3r_colmap.run import EXIT_NO_MODEL, main, report_path
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene
from mast3r_colmap.verification import verify_matches
from test_export import build_database, make_scene

ALL_STAGES = ["image_check", "model_load", "pairs", "focal_priors", "database_write", "matching", "consolidation",
              "verification", "mapping"]
NUM_IMAGES, NUM_PAIRS = 5, 10  # exhaustive pairs of 5 images
#: the settings of every run of the scene (a re-run on its database must keep them)
FLAGS = ["--pairs", "exhaustive", "--camera-model", "PINHOLE", "--cell-size", "2"]


# ---- the collector --------------------------------------------------------------------------------

def test_stage_timing_adds_up_and_stays_within_the_total():
    r = RunReport(["tool", "a"])
    with r.stage("a"):
        time.sleep(0.05)
    with r.stage("b"):
        pass
    with r.stage("a"):  # entered again: the times add up
        time.sleep(0.02)
    r.finish()
    d = r.to_dict()
    assert list(d["stages"]) == ["a", "b"] and d["status"] == "ok" and d["error"] is None
    assert 0.07 <= d["stages"]["a"]["seconds"] < 1.0 and 0 <= d["stages"]["b"]["seconds"] < 0.05
    assert all(s["status"] == "ok" for s in d["stages"].values())
    assert sum(s["seconds"] for s in d["stages"].values()) <= d["total_s"]
    assert d["command"] == ["tool", "a"] and d["tool"] == "mast3r-colmap" and d["format"] == 1
    total = d["total_s"]
    time.sleep(0.01)
    r.finish()  # the first finish counts
    assert r.to_dict()["total_s"] == total


def test_a_failing_stage_is_recorded_and_raised_again():
    r = RunReport([])
    with pytest.raises(RuntimeError, match="boom"):
        with r.stage("outer"):
            with r.stage("inner"):
                raise RuntimeError("boom")
    assert r.status == "failed"
    assert r.error == {"type": "RuntimeError", "message": "boom", "stage": "inner"}  # the innermost stage
    assert r.stages["inner"]["status"] == r.stages["outer"]["status"] == "failed"
    r.fail(ValueError("later"))  # a second error does not replace the first
    assert r.error["type"] == "RuntimeError"
    r.finish()
    assert r.to_dict()["status"] == "failed"

    r = RunReport([])
    with pytest.raises(KeyboardInterrupt):
        with r.stage("matching"):
            raise KeyboardInterrupt
    assert r.error == {"type": "KeyboardInterrupt", "message": "interrupted", "stage": "matching"}


def test_an_error_without_exception_marks_its_stage_failed():
    r = RunReport([])
    with r.stage("mapping"):
        r.record_error("NoModel", "no model", stage="mapping")
    r.finish()
    assert r.stages["mapping"]["status"] == "failed" and r.status == "failed"
    assert r.to_dict()["error"] == {"type": "NoModel", "message": "no model", "stage": "mapping"}
    running = RunReport([])
    assert running.status == "running" and running.to_dict()["finished"] is None


def test_histogram_exact_bins():
    h = histogram([0, 0, 5, 10, 29, 30, 12345, 40000])
    assert h["edges"] == list(HISTOGRAM_EDGES) == [0, 1, 10, 30, 100, 300, 1000, 3000, 10000, 30000]
    assert h["counts"] == [2, 1, 2, 1, 0, 0, 0, 0, 1, 1]
    assert (h["count"], h["min"], h["median"], h["max"]) == (8, 0, 19.5, 40000)
    assert h["mean"] == pytest.approx(sum([0, 0, 5, 10, 29, 30, 12345, 40000]) / 8)
    odd = histogram(np.array([3, 1, 2], np.int64))
    assert odd["median"] == 2 and all(type(odd[k]) is int for k in ("min", "median", "max"))  # counts stay ints
    assert histogram([0.5, 1.5])["counts"][:2] == [1, 1]
    empty = histogram([])
    assert empty["counts"] == [0] * 10 and empty["count"] == 0 and empty["median"] is None
    with pytest.raises(ValueError, match="below the first histogram edge"):
        histogram([-1])
    with pytest.raises(ValueError, match="must increase"):
        histogram([1], edges=[0, 10, 5])


def test_everything_becomes_strict_json():
    @dataclasses.dataclass
    class Conf:
        size: int = 3
        path: Path = Path("/x/y")

    value = {"path": Path("/a/b"), 1: np.int64(7), "array": np.arange(3), "nan": float("nan"), "inf": math.inf,
             "conf": Conf(), "options": pycolmap.TwoViewGeometryOptions(min_num_inliers=17),
             "mode": pycolmap.CameraMode.PER_IMAGE, "set": {2, 1}, "other": object}
    out = jsonable(value)
    json.dumps(out, allow_nan=False)
    assert out["path"] == "/a/b" and out["1"] == 7 and out["array"] == [0, 1, 2]
    assert out["nan"] is None and out["inf"] is None and out["conf"] == {"size": 3, "path": "/x/y"}
    assert out["options"]["min_num_inliers"] == 17 and out["mode"] == "PER_IMAGE" and out["set"] == [1, 2]
    assert out["other"] == repr(object)


def test_write_is_atomic_json(tmp_path):
    r = RunReport(["x"])
    r.set_counts(rate=float("nan"), n=np.int32(3))
    r.update_settings(folder=tmp_path)
    path = tmp_path / "report.json"
    path.write_text("old")
    assert r.write(path) == path
    first = json.loads(path.read_text())
    assert first["counts"] == {"rate": None, "n": 3} and first["settings"] == {"folder": str(tmp_path)}
    assert first["status"] == "running"
    r.finish()
    r.write(path)
    assert json.loads(path.read_text())["status"] == "ok"
    assert sorted(os.listdir(tmp_path)) == ["report.json"]  # no temporary file left
    with pytest.raises(OSError):
        r.write(tmp_path / "missing" / "report.json")
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_versions_and_resources_without_importing_torch():
    v = report_mod.versions()
    assert v["mast3r_colmap"] == mast3r_colmap.__version__ and v["torch"] == torch.__version__
    assert v["pycolmap"] == pycolmap.__version__ and v["numpy"] == np.__version__
    assert v["cuda"] == torch.version.cuda
    res = report_mod.peak_resources()
    import resource

    assert 0 < res["peak_host_ram_mib"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 1
    if not torch.cuda.is_initialized():  # CUDA not used in this process: no GPU numbers
        assert res["peak_gpu_memory_mib"] is None and v["device"].startswith("cpu")
    # the report never loads torch or pycolmap itself
    code = ("import sys, json; from mast3r_colmap.report import RunReport; r = RunReport(['x']); r.finish(); "
            "d = r.to_dict(); print(json.dumps([sorted({'torch', 'pycolmap'} & set(sys.modules)), "
            "d['versions']['torch'], d['resources']['peak_gpu_memory_mib']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # without torch loaded the version comes from the distribution's metadata (no local "+cu130" part)
    assert json.loads(out.stdout) == [[], importlib.metadata.version("torch"), None]


def test_gpu_numbers_when_cuda_was_used(monkeypatch):
    """No GPU here: a stand-in torch whose CUDA was initialised (the numbers torch's calls would give)."""
    class Cuda:
        is_initialized = staticmethod(lambda: True)
        max_memory_allocated = staticmethod(lambda: 3 * 2 ** 20 + 2 ** 19)
        get_device_name = staticmethod(lambda: "Stand-in GPU")

    class FakeTorch:
        __version__ = "9.9"
        cuda = Cuda
        version = type("version", (), {"cuda": "12.8"})

    monkeypatch.setitem(sys.modules, "torch", FakeTorch)
    v = report_mod.versions()
    assert (v["torch"], v["cuda"], v["device"]) == ("9.9", "12.8", "Stand-in GPU")
    assert report_mod.peak_resources()["peak_gpu_memory_mib"] == 3.5


# ---- the report of a command-line run ---------------------------------------------------------------

@pytest.fixture(scope="module")
def scene_root(tmp_path_factory):
    pycolmap.logging.minloglevel = 2
    scene = SyntheticScene.make(num_cameras=NUM_IMAGES, image_size=(320, 240), seed=2, kind="planes", arc_deg=50)
    root = tmp_path_factory.mktemp("report")
    scene.write_images(root / "images")
    return scene, root


def _main(scene, argv, **patches) -> int:
    """run.main with the scene's oracle as the network (at 160 px), and ``patches`` of pycolmap."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mast3r_colmap.cli.load_network", lambda args, device=None: SyntheticNetwork(scene))
        mp.setattr("mast3r_colmap.matching.matcher.get_config",
                   lambda preset="default", **kw: get_config(preset, image_size=160, **kw))
        for name, value in patches.items():
            mp.setattr(pycolmap, name, value)
        return main([str(a) for a in argv] + ["--no-progress"])


@pytest.fixture(scope="module")
def ok_run(scene_root):
    scene, root = scene_root
    argv = [root / "images", root / "db" / "database.db", *FLAGS, "--checkpoint", root / "weights.pth"]
    code = _main(scene, argv)
    return argv, code, json.loads((root / "db" / "sparse" / "report.json").read_text())


def test_report_of_a_run(scene_root, ok_run):
    scene, root = scene_root
    argv, code, rep = ok_run
    assert code == 0
    assert rep["status"] == "ok" and rep["error"] is None
    assert rep["command"] == ["mast3r-colmap", *map(str, argv), "--no-progress"]
    # settings
    s = rep["settings"]
    assert s["checkpoint"] == str(root / "weights.pth") and s["preset"] == "default" and s["device"] == "cpu"
    assert s["image_dir"] == os.path.abspath(root / "images")  # visualize takes the images from here
    assert (s["pairs"], s["mapper"], s["camera_mode"], s["camera_model"]) == ("exhaustive", "incremental", "auto",
                                                                                "PINHOLE")
    assert s["keypoints"] == dataclasses.asdict(KeypointConfig(cell_size=2))
    expected = Matcher(SyntheticNetwork(scene), get_config("default", image_size=160)).settings()
    assert s["matcher"] == jsonable(expected) and s["matcher"]["scene"] == SyntheticNetwork(scene).settings()["scene"]
    assert s["matcher_config"]["image_size"] == 160 and s["arguments"]["pairs"] == "exhaustive"
    assert set(rep["versions"]) >= {"mast3r_colmap", "python", "numpy", "torch", "pycolmap", "cuda", "device"}
    # stages
    assert list(rep["stages"]) == ALL_STAGES
    assert all(st["status"] == "ok" and st["seconds"] >= 0 for st in rep["stages"].values())
    assert sum(st["seconds"] for st in rep["stages"].values()) <= rep["total_s"]
    # counts: every image encoded once (the cache holds them all), every pair matched now
    c = rep["counts"]
    assert (c["num_images"], c["num_pairs"], c["pairs_matched"], c["pairs_from_store"],
            c["pairs_already_in_database"]) == (NUM_IMAGES, NUM_PAIRS, NUM_PAIRS, 0, 0)
    assert c["encoder_runs"] == NUM_IMAGES and c["encoder_cache_hits"] >= 2 * NUM_PAIRS - NUM_IMAGES  # + focal priors
    assert c["pairs_per_s"] == pytest.approx(NUM_PAIRS / rep["stages"]["matching"]["seconds"])
    # histograms, checked against the database
    with pycolmap.Database.open(str(root / "db" / "database.db")) as db:
        ids = {im.image_id: im.name for im in db.read_all_images()}
        pair_ids, _ = db.read_num_matches()
        matches, inliers = [], []
        for pid in pair_ids:
            i, j = (int(k) for k in pycolmap.pair_id_to_image_pair(int(pid)))
            matches.append(len(db.read_matches(i, j)))
            inliers.append(len(db.read_two_view_geometry(i, j).inlier_matches))
    assert len(matches) == NUM_PAIRS and len(ids) == NUM_IMAGES
    h = rep["histograms"]
    assert h["keypoint_matches_per_pair"] == histogram(matches)
    assert h["inliers_per_verified_pair"] == histogram(inliers)
    assert sum(h["matches_per_pair"]["counts"]) == h["matches_per_pair"]["count"] == NUM_PAIRS
    assert h["matches_per_pair"]["min"] >= h["keypoint_matches_per_pair"]["min"] > 100
    assert c["num_matches"] == pytest.approx(h["matches_per_pair"]["mean"] * NUM_PAIRS)
    assert c["num_keypoint_matches"] == sum(matches) and c["num_verified_pairs"] == sum(n > 0 for n in inliers)
    # the model: the numbers of summary.json (kept as it was)
    summary = json.loads((root / "db" / "sparse" / "summary.json").read_text())
    assert rep["model"] == summary and summary["num_registered_images"] == NUM_IMAGES
    assert summary["num_points3D"] == pycolmap.Reconstruction(str(root / "db" / "sparse")).num_points3D()
    assert set(rep["model"]) >= {"num_registered_images", "num_points3D", "mean_track_length",
                                 "mean_reprojection_error"}
    assert rep["resources"]["peak_host_ram_mib"] > 0
    if not torch.cuda.is_initialized():
        assert rep["resources"]["peak_gpu_memory_mib"] is None


def _copy_database(root: Path, name: str) -> Path:
    """A copy of the finished run's database (all pairs matched and verified already)."""
    folder = root / name
    folder.mkdir()
    shutil.copy(root / "db" / "database.db", folder / "database.db")
    return folder / "database.db"


def test_report_of_a_failed_mapping(scene_root, ok_run):
    scene, root = scene_root
    db = _copy_database(root, "failing")

    def explode(*args, **kwargs):
        raise RuntimeError("mapper exploded")

    with pytest.raises(RuntimeError, match="mapper exploded"):
        _main(scene, [root / "images", db, *FLAGS],
              incremental_mapping=explode)
    rep = json.loads((db.parent / "sparse" / "report.json").read_text())
    assert rep["status"] == "failed"
    assert rep["error"] == {"type": "RuntimeError", "message": "mapper exploded", "stage": "mapping"}
    assert rep["stages"]["mapping"]["status"] == "failed" and rep["model"] is None and rep["finished"]
    assert all(st["status"] == "ok" for name, st in rep["stages"].items() if name != "mapping")
    # a re-run on a finished database: nothing matched, every pair was in the database
    c = rep["counts"]
    assert (c["num_pairs"], c["pairs_already_in_database"], c["pairs_matched"]) == (NUM_PAIRS, NUM_PAIRS, 0)
    assert rep["histograms"]["matches_per_pair"]["count"] == 0 and c["pairs_per_s"] is None
    assert rep["histograms"]["inliers_per_verified_pair"] == ok_run[2]["histograms"]["inliers_per_verified_pair"]
    assert json.loads((db.parent / "sparse" / "summary.json").read_text())["status"] == "failed"


def test_report_of_a_run_without_model(scene_root, caplog):
    scene, root = scene_root
    db = _copy_database(root, "nomodel")
    with caplog.at_level(logging.INFO):
        code = _main(scene, [root / "images", db, *FLAGS],
                     incremental_mapping=lambda *args, **kwargs: {})
    assert code == EXIT_NO_MODEL
    rep = json.loads(report_path(db, "incremental").read_text())
    assert rep["status"] == "failed" and rep["error"]["type"] == "NoModel" and rep["error"]["stage"] == "mapping"
    assert f"of {NUM_PAIRS} pairs passed geometric verification" in rep["error"]["message"]
    assert rep["stages"]["mapping"]["status"] == "failed" and "run report (failed)" in caplog.text


def test_report_beside_the_database_without_mapper(scene_root):
    scene, root = scene_root
    db = _copy_database(root, "nomapper")
    assert _main(scene, [root / "images", db, *FLAGS, "--mapper", "none"]) == 0
    path = db.with_name("database.db.report.json")
    assert report_path(db, "none") == path
    assert sorted(os.listdir(db.parent)) == ["database.db", "database.db.mast3r-matches.sqlite",
                                             "database.db.report.json"]
    rep = json.loads(path.read_text())
    assert rep["status"] == "ok" and rep["settings"]["mapper"] == "none" and rep["model"] is None
    assert "mapping" not in rep["stages"] and rep["counts"]["num_pairs"] == NUM_PAIRS


# ---- mapping progress ---------------------------------------------------------------------------------

class _Bar:
    """Records what the mapper does with its progress bar."""

    made: list = []

    def __init__(self, total=None, desc=None, unit=None, disable=False):
        self.total, self.desc, self.disable, self.n, self.updates = total, desc, disable, 0, []
        _Bar.made.append(self)

    def update(self, n=1):
        self.updates.append(n)
        self.n += n

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        self.closed = True


def test_incremental_mapping_progress_sees_every_registered_image(tmp_path, monkeypatch, caplog):
    scene = make_scene(tmp_path, n_images=6, n_points=300, seed=1)
    db = tmp_path / "database.db"
    build_database(scene, db)
    verify_matches(db, [m.pair for m in scene.matches])
    monkeypatch.setattr(mapping, "tqdm", _Bar)
    _Bar.made = []
    with caplog.at_level(logging.DEBUG, logger="mast3r_colmap.mapping"):
        rec = mapping.incremental(db, scene.image_dir, tmp_path / "sparse",
                                  options={"ba_refine_focal_length": False}, progress=False)
    assert rec is not None and rec.num_reg_images() == 6
    (bar,) = _Bar.made
    assert (bar.total, bar.desc, bar.disable, bar.closed) == (6, "mapping", True, True)
    assert bar.n == 6 and bar.updates[0] == 2 and bar.updates[1:] == [1] * 4  # the initial pair, then one by one
    assert "model 1 starts from an initial pair" in caplog.text
    assert "6 image registrations (6 images in the database)" in caplog.text
