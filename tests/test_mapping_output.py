"""The mappers' output folder: never touch what the tool did not write, replace our model only on success,
mark a failed run, leave no scratch folders, and route COLMAP's log (no files in the temp folder)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mast3r_colmap  # noqa: F401  (before pycolmap: see mast3r_colmap/__init__.py)
import pycolmap
import pytest

from mast3r_colmap import mapping
from mast3r_colmap.verification import verify_matches
from test_export import Scene, build_database, make_scene

FAST = {"ba_refine_focal_length": False, "ba_refine_extra_params": False}
MODEL_FILES = ("cameras.bin", "frames.bin", "images.bin", "points3D.bin", "rigs.bin")


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Scene:
    return make_scene(tmp_path_factory.mktemp("scene"), n_images=6, n_points=300, seed=1)


@pytest.fixture(scope="module")
def good_db(scene: Scene, tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("good") / "database.db"
    build_database(scene, db)
    verify_matches(db, [m.pair for m in scene.matches])
    return db


@pytest.fixture(scope="module")
def bad_db(scene: Scene, tmp_path_factory) -> Path:
    """Matches without verified two-view geometries: pycolmap makes no model."""
    db = tmp_path_factory.mktemp("bad") / "database.db"
    build_database(scene, db)
    return db


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX path -> digest)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _scratch(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".mast3r-colmap-tmp-"))


def _marker(folder: Path) -> dict:
    return json.loads((folder / mapping.MARKER_FILE).read_text())


@pytest.mark.parametrize("foreign", ["cameras.bin", "points3D.txt", "summary.json", "models"])
def test_foreign_model_files_are_refused_and_untouched(good_db: Path, scene: Scene, tmp_path: Path,
                                                       foreign: str) -> None:
    out = tmp_path / "sparse"
    out.mkdir()
    if foreign == "models":
        (out / "models" / "0").mkdir(parents=True)
        (out / "models" / "0" / "cameras.bin").write_bytes(b"someone else's model")
    else:
        (out / foreign).write_bytes(b"someone else's model")
    before = _digests(out)
    with pytest.raises(ValueError, match=f"already holds {foreign}, not written by mast3r-colmap"):
        mapping.check_output(out)
    for run in (mapping.incremental, mapping.global_mapping):
        with pytest.raises(ValueError, match=foreign):
            run(good_db, scene.image_dir, out, options=None)
    assert _digests(out) == before and sorted(os.listdir(out)) == [foreign]   # nothing written, nothing removed


def test_output_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        mapping.check_output(tmp_path / "f")
    mapping.check_output(tmp_path / "missing")                                 # fine: created later


def test_success_replaces_only_our_files(good_db: Path, bad_db: Path, scene: Scene, tmp_path: Path) -> None:
    out = tmp_path / "sparse"
    out.mkdir()
    (out / "notes.txt").write_text("mine")                                     # not a model file: allowed
    rec = mapping.incremental(good_db, scene.image_dir, out, options=FAST)
    assert rec is not None and rec.num_reg_images() == 6
    assert sorted(os.listdir(out)) == sorted([*MODEL_FILES, "mast3r-colmap.json", "models", "notes.txt",
                                              "summary.json"])
    marker = _marker(out)
    assert marker["tool"] == "mast3r-colmap" and marker["status"] == "ok" and marker["mapper"] == "incremental"
    assert marker["files"] == sorted([*MODEL_FILES, "models", "summary.json"])
    assert json.loads((out / "summary.json").read_text()) == mapping.summary(rec)
    assert sorted(os.listdir(out / "models")) == ["0"]
    assert pycolmap.Reconstruction(str(out)).num_reg_images() == 6
    mapping.check_output(out)                                                  # ours: no complaint

    # a stale per-model folder of ours is replaced, not merged
    (out / "models" / "7").mkdir()
    rec2 = mapping.global_mapping(good_db, scene.image_dir, out)
    assert rec2 is not None and rec2.num_reg_images() == 6
    assert sorted(os.listdir(out / "models")) == ["0"] and _marker(out)["mapper"] == "global"
    assert (out / "notes.txt").read_text() == "mine" and _scratch(out) == []


def test_failed_mapping_keeps_previous_model_marked_not_current(good_db: Path, bad_db: Path, scene: Scene,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "sparse"
    rec = mapping.incremental(good_db, scene.image_dir, out, options=FAST)
    good_summary = mapping.summary(rec)
    model_before = {k: v for k, v in _digests(out).items() if k not in ("summary.json", "mast3r-colmap.json")}

    assert mapping.incremental(bad_db, scene.image_dir, out, options=FAST) is None
    after = _digests(out)
    assert {k: after[k] for k in model_before} == model_before                 # previous model untouched
    failed = json.loads((out / "summary.json").read_text())
    assert failed == {"status": "failed", "mapper": "incremental", "reason": "pycolmap reconstructed no model",
                      "previous": good_summary}
    assert _marker(out)["status"] == "failed" and _scratch(out) == []

    assert mapping.global_mapping(bad_db, scene.image_dir, out) is None        # twice: still the same previous
    assert json.loads((out / "summary.json").read_text())["previous"] == good_summary

    fresh = tmp_path / "fresh"                                                 # no previous model at all
    assert mapping.incremental(bad_db, scene.image_dir, fresh, options=FAST) is None
    assert sorted(os.listdir(fresh)) == ["mast3r-colmap.json", "summary.json"]
    assert json.loads((fresh / "summary.json").read_text())["previous"] is None
    assert mapping.incremental(good_db, scene.image_dir, fresh, options=FAST) is not None   # then a success
    # another mapping run: counts equal, the reprojection error up to multi-threaded bundle adjustment's rounding
    assert json.loads((fresh / "summary.json").read_text()) == pytest.approx(good_summary, rel=1e-5)


@pytest.mark.parametrize("error, reason", [(RuntimeError("boom"), "RuntimeError: boom"),
                                           (KeyboardInterrupt(), "interrupted")])
def test_error_during_mapping(good_db: Path, scene: Scene, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              error: BaseException, reason: str) -> None:
    out = tmp_path / "sparse"
    mapping.incremental(good_db, scene.image_dir, out, options=FAST)
    model_before = _digests(out / "models")

    def fail(db, images, models_dir, options, **callbacks):
        Path(models_dir, "0").mkdir()
        Path(models_dir, "0", "cameras.bin").write_bytes(b"half written")
        raise error

    monkeypatch.setattr(pycolmap, "incremental_mapping", fail)
    with pytest.raises(type(error)):
        mapping.incremental(good_db, scene.image_dir, out, options=FAST)
    assert _digests(out / "models") == model_before and _scratch(out) == []
    assert json.loads((out / "summary.json").read_text())["reason"] == reason


def test_scratch_of_dead_runs_is_removed(good_db: Path, scene: Scene, tmp_path: Path) -> None:
    out = tmp_path / "sparse"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (out / f".mast3r-colmap-tmp-{dead}-abc").mkdir()
    (out / f".mast3r-colmap-tmp-{os.getpid()}-live").mkdir()                  # a running process: kept
    (out / ".mast3r-colmap-tmp-notapid").mkdir()                               # not ours to judge: kept
    mapping.incremental(good_db, scene.image_dir, out, options=FAST)
    assert _scratch(out) == [f".mast3r-colmap-tmp-{os.getpid()}-live", ".mast3r-colmap-tmp-notapid"]


def test_triangulate_never_writes_into_the_reference(scene: Scene, tmp_path: Path) -> None:
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    scene.reconstruction().write(str(ref_dir))
    before = _digests(ref_dir)
    db = tmp_path / "tri.db"
    mapping.database_from_reconstruction(ref_dir, db)
    with pytest.raises(ValueError, match="not written by mast3r-colmap"):
        mapping.triangulate(ref_dir, db, scene.image_dir, ref_dir)
    assert _digests(ref_dir) == before
    out = tmp_path / "tri"
    rec = mapping.triangulate(ref_dir, db, scene.image_dir, out)             # no matches: no points, published
    assert rec.num_points3D() == 0 and _marker(out)["status"] == "ok" and _scratch(out) == []
    assert json.loads((out / "summary.json").read_text()) == mapping.summary(rec)


def test_colmap_messages_go_to_python_logging(bad_db: Path, scene: Scene, tmp_path: Path, caplog,
                                              capfd) -> None:
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        assert mapping.incremental(bad_db, scene.image_dir, tmp_path / "sparse", options=FAST) is None
    colmap = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "mast3r_colmap.colmap"]
    assert (logging.WARNING, "Failed to create any sparse model (sfm.cc:310)") in colmap
    assert all(level >= logging.INFO for level, _ in colmap)                  # COLMAP's INFO lines are DEBUG
    assert "sfm.cc" not in capfd.readouterr().err                             # no raw glog lines


def test_no_files_in_the_temp_folder(good_db: Path, bad_db: Path, scene: Scene, tmp_path: Path) -> None:
    """Library use, no logging set up: glog would write hidden log files into the temp folder."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    script = ("import sys; from mast3r_colmap import mapping\n"
              "ok = mapping.incremental(sys.argv[1], sys.argv[2], sys.argv[3])\n"
              "bad = mapping.global_mapping(sys.argv[4], sys.argv[2], sys.argv[5])\n"
              "assert ok is not None and bad is None\n")
    proc = subprocess.run([sys.executable, "-c", script, str(good_db), str(scene.image_dir),
                           str(tmp_path / "ok"), str(bad_db), str(tmp_path / "bad")],
                          env=dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp) == []
    assert "pose_graph" not in proc.stderr and "sfm.cc" not in proc.stderr   # no raw glog lines either
