"""Incremental, global and known-pose mapping on the synthetic scene of ``test_export.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from mast3r_colmap import mapping
from mast3r_colmap.export import colmap_db
from mast3r_colmap.verification import verify_matches
from test_export import Scene, build_database, make_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Scene:
    return make_scene(tmp_path_factory.mktemp("scene"), n_images=8, n_points=600, seed=1)


@pytest.fixture(scope="module")
def verified_db(scene: Scene, tmp_path_factory) -> Path:
    """Database with SIMPLE_RADIAL prior intrinsics, raw matches and verified two-view geometries."""
    db_path = tmp_path_factory.mktemp("db") / "database.db"
    build_database(scene, db_path)
    verify_matches(db_path, [m.pair for m in scene.matches])
    return db_path


def _rotation_angle_deg(R: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1.0, 1.0))))


def pose_errors(rec: pycolmap.Reconstruction, scene: Scene) -> tuple[float, float]:
    """Max rotation error (deg) and max centre error after a sim3 alignment on the camera centres."""
    names = [img.name for img in rec.images.values() if img.has_pose]
    est = np.array([rec.find_image_with_name(n).projection_center() for n in names])
    gt = np.array([scene.cams_from_world[n].inverse().translation for n in names])
    sim = pycolmap.estimate_sim3d(est, gt)                # gt_from_est
    assert sim is not None
    R_sim = sim.rotation.matrix()
    rot_err, centre_err = 0.0, 0.0
    for n, c_gt in zip(names, gt):
        R_est = rec.find_image_with_name(n).cam_from_world().rotation.matrix() @ R_sim.T
        R_gt = scene.cams_from_world[n].rotation.matrix()
        rot_err = max(rot_err, _rotation_angle_deg(R_est @ R_gt.T))
        c = sim * rec.find_image_with_name(n).projection_center().reshape(1, 3)
        centre_err = max(centre_err, float(np.linalg.norm(c.reshape(3) - c_gt)))
    return rot_err, centre_err


def _check_summary(rec: pycolmap.Reconstruction, out: Path, n_images: int) -> dict:
    s = json.loads((out / "summary.json").read_text())
    assert s == mapping.summary(rec)
    assert s["num_images"] == n_images and s["num_registered_images"] == n_images
    assert s["num_points3D"] > 300 and s["num_cameras"] == 1
    assert 2.0 < s["mean_track_length"] <= n_images
    assert 0.0 < s["mean_reprojection_error"] < 1.0
    assert s["num_observations"] == pytest.approx(s["num_points3D"] * s["mean_track_length"])
    for f in ("cameras.bin", "images.bin", "points3D.bin"):
        assert (out / f).is_file()
    return s


def test_incremental_registers_all_images(scene: Scene, verified_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "sfm"
    rec = mapping.incremental(verified_db, scene.image_dir, out,
                              options={"ba_refine_focal_length": False, "ba_refine_extra_params": False})
    assert rec is not None and rec.num_reg_images() == len(scene.names)
    rot_err, centre_err = pose_errors(rec, scene)
    assert rot_err < 0.5 and centre_err < 0.05
    _check_summary(rec, out, len(scene.names))
    reloaded = pycolmap.Reconstruction(str(out))
    assert reloaded.num_points3D() == rec.num_points3D()
    again = mapping.incremental(verified_db, scene.image_dir, tmp_path / "again",      # seeded: repeatable
                                options={"ba_refine_focal_length": False, "ba_refine_extra_params": False})
    assert again.num_points3D() == rec.num_points3D()
    for img_id, img in rec.images.items():
        np.testing.assert_allclose(again.images[img_id].cam_from_world().matrix(),
                                   img.cam_from_world().matrix(), atol=1e-9)
    with pytest.raises(ValueError, match="unknown option"):
        mapping.incremental(verified_db, scene.image_dir, out, options={"ba_refine_focal": False})


def test_global_mapping_registers_all_images(scene: Scene, verified_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "glomap"
    rec = mapping.global_mapping(verified_db, None, out)
    assert rec is not None and rec.num_reg_images() == len(scene.names)
    rot_err, centre_err = pose_errors(rec, scene)
    assert rot_err < 0.5 and centre_err < 0.05
    _check_summary(rec, out, len(scene.names))


def test_triangulate_with_known_poses(scene: Scene, tmp_path: Path) -> None:
    reference = scene.reconstruction()
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    reference.write(str(ref_dir))
    db_path = tmp_path / "tri.db"
    ids = mapping.database_from_reconstruction(ref_dir, db_path)
    assert ids == {img.name: img_id for img_id, img in reference.images.items()}
    assert mapping.database_from_reconstruction(reference, db_path) == ids          # re-run: no-op
    # The import step finds the images the reference put there and reuses their ids.
    assert colmap_db.import_images(db_path, scene.image_dir, scene.names) == ids
    colmap_db.write_keypoints(db_path, ids, scene.keypoints)
    colmap_db.write_matches(db_path, ids, scene.matches)
    verify_matches(db_path)

    out = tmp_path / "tri"
    rec = mapping.triangulate(ref_dir, db_path, scene.image_dir, out)
    s = _check_summary(rec, out, len(scene.names))
    assert s["num_points3D"] > 0.8 * len(scene.points3D)
    assert s["mean_reprojection_error"] < 0.6
    for img_id, img in reference.images.items():                 # poses kept exactly
        np.testing.assert_allclose(rec.images[img_id].cam_from_world().matrix(),
                                   img.cam_from_world().matrix(), atol=1e-9)
    # Triangulated points are at the true points (no gauge freedom here).
    errs = []
    for p in rec.points3D.values():
        el = p.track.elements[0]
        name = rec.images[el.image_id].name
        pid = scene.point_ids[name][el.point2D_idx]
        if pid >= 0:
            errs.append(np.linalg.norm(p.xyz - scene.points3D[pid]))
    assert np.median(errs) < 0.01

    other = scene.reconstruction()
    other.images[1].name = "renamed.png"
    with pytest.raises(ValueError, match="do not match"):
        mapping.database_from_reconstruction(other, db_path)
