"""COLMAP database and hloc HDF5 export on a synthetic scene with known geometry.

:func:`make_scene` (also used by ``test_mapping.py``) builds random 3D points seen by cameras on an arc,
projects them with noise, and turns shared point ids into per-pair matches with outliers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pycolmap
import pytest
from PIL import Image

from mast3r_colmap.cameras import read_image_info
from mast3r_colmap.export import colmap_db, hloc_h5
from mast3r_colmap.verification import verify_matches
from mast3r_colmap.structures import ImageKeypoints, IndexMatches

W, H, F = 640, 480, 500.0


@dataclass
class Scene:
    """A synthetic scene: ground-truth model, image files, keypoints (hloc convention) and matches."""

    image_dir: Path
    names: list[str]
    points3D: np.ndarray                    # (P, 3)
    cams_from_world: dict[str, pycolmap.Rigid3d]
    keypoints: dict[str, ImageKeypoints]    # hloc convention: COLMAP projection - 0.5
    point_ids: dict[str, np.ndarray]        # (K,) point id per keypoint, -1 for distractors
    matches: list[IndexMatches]
    inlier_masks: dict[tuple[str, str], np.ndarray]
    camera: pycolmap.Camera

    @property
    def sizes(self) -> dict[str, tuple[int, int]]:
        return {n: (W, H) for n in self.names}

    def reconstruction(self) -> pycolmap.Reconstruction:
        """The ground truth as a pycolmap model (ids 1..n in ``names`` order, no points)."""
        rec = pycolmap.Reconstruction()
        c = self.camera
        cam = pycolmap.Camera(model=c.model, width=c.width, height=c.height, params=c.params, camera_id=1)
        rec.add_camera_with_trivial_rig(cam)
        for i, name in enumerate(self.names, start=1):
            rec.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=1, image_id=i),
                                             self.cams_from_world[name])
        return rec


def look_at(centre: np.ndarray, target: np.ndarray) -> pycolmap.Rigid3d:
    """cam_from_world of a camera at ``centre`` looking at ``target`` (y down)."""
    z = target - centre
    z /= np.linalg.norm(z)
    x = np.cross(np.array([0.0, 1.0, 0.0]), z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    return pycolmap.Rigid3d(pycolmap.Rotation3d(R), -R @ centre)


def make_scene(tmp_path: Path, n_images: int = 8, n_points: int = 800, noise: float = 0.3,
               outlier_ratio: float = 0.1, seed: int = 0, model: str = "PINHOLE",
               prefix: str = "seq/img") -> Scene:
    rng = np.random.default_rng(seed)
    image_dir = tmp_path / "images"
    points = rng.uniform([-2.0, -1.5, -1.5], [2.0, 1.5, 1.5], size=(n_points, 3))
    params = [F, F, W / 2, H / 2] if model == "PINHOLE" else [F, W / 2, H / 2, 0.0]
    camera = pycolmap.Camera(model=model, width=W, height=H, params=params)
    names, poses, keypoints, point_ids = [], {}, {}, {}
    for i, angle in enumerate(np.linspace(-0.6, 0.6, n_images)):
        name = f"{prefix}{i:02d}.png"
        centre = 7.0 * np.array([np.sin(angle), 0.1 * np.cos(3 * angle), -np.cos(angle)])
        pose = look_at(centre, rng.normal(0, 0.1, 3))
        uv = camera.img_from_cam(pose * points)                     # COLMAP convention
        uv = uv + rng.normal(0, noise, uv.shape)
        ids = np.flatnonzero((uv[:, 0] > 1) & (uv[:, 0] < W - 1) & (uv[:, 1] > 1) & (uv[:, 1] < H - 1))
        distract = rng.uniform([0, 0], [W, H], size=(len(ids) // 20, 2))
        kps = np.concatenate([uv[ids], distract]) - 0.5             # hloc convention
        pid = np.concatenate([ids, -np.ones(len(distract), np.int64)])
        order = rng.permutation(len(kps))
        names.append(name)
        poses[name] = pose
        keypoints[name] = ImageKeypoints(name, kps[order], rng.uniform(1, 5, len(kps)))
        point_ids[name] = pid[order]
        path = image_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (W, H)).save(path)
    matches, masks = [], {}
    for a, b in itertools.combinations(range(n_images), 2):
        n0, n1 = names[a], names[b]
        if b % 2:  # half of the pairs in decreasing image order
            n0, n1 = n1, n0
        p0, p1 = point_ids[n0], point_ids[n1]
        common = np.intersect1d(p0[p0 >= 0], p1[p1 >= 0])
        where0 = {p: k for k, p in enumerate(p0) if p >= 0}
        where1 = {p: k for k, p in enumerate(p1) if p >= 0}
        good = np.array([[where0[p], where1[p]] for p in common], np.int64).reshape(-1, 2)
        n_out = int(round(outlier_ratio * len(good) / (1 - outlier_ratio)))
        free0 = np.setdiff1d(np.arange(len(p0)), good[:, 0])
        free1 = np.setdiff1d(np.arange(len(p1)), good[:, 1])
        n_out = min(n_out, len(free0), len(free1))
        bad = np.stack([rng.choice(free0, n_out, replace=False), rng.choice(free1, n_out, replace=False)], -1)
        m = np.concatenate([good, bad])
        mask = np.r_[np.ones(len(good), bool), np.zeros(n_out, bool)]
        order = rng.permutation(len(m))
        matches.append(IndexMatches(n0, n1, m[order], rng.uniform(0, 1, len(m))))
        masks[(n0, n1)] = mask[order]
    return Scene(image_dir, names, points, poses, keypoints, point_ids, matches, masks, camera)


def build_database(scene: Scene, db_path: Path, intrinsics: str | None = "500,320,240,0") -> dict[str, int]:
    """Import images, keypoints and matches of ``scene`` (SIMPLE_RADIAL, single camera)."""
    ids = colmap_db.import_images(db_path, scene.image_dir, scene.names, camera_mode="single",
                                  intrinsics=intrinsics)
    colmap_db.write_keypoints(db_path, ids, scene.keypoints)
    colmap_db.write_matches(db_path, ids, scene.matches)
    return ids


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Scene:
    return make_scene(tmp_path_factory.mktemp("scene"))


# ----------------------------------------------------------------------------------------------
# COLMAP database
# ----------------------------------------------------------------------------------------------


def test_db_round_trip_and_rerun(scene: Scene, tmp_path: Path) -> None:
    db_path = tmp_path / "db.db"
    ids = build_database(scene, db_path)
    assert sorted(ids.values()) == list(range(1, len(scene.names) + 1))
    with colmap_db.open_database(db_path) as db:
        assert db.num_cameras() == 1 and db.num_images() == len(scene.names)
        assert db.num_rigs() == 1 and db.num_frames() == len(scene.names)
        cam = db.read_camera(1)
        assert cam.model == pycolmap.CameraModelId.SIMPLE_RADIAL and cam.has_prior_focal_length
        np.testing.assert_allclose(cam.params, [500, 320, 240, 0])
        for name, kp in scene.keypoints.items():
            stored = db.read_keypoints(ids[name])[:, :2]
            np.testing.assert_allclose(stored, kp.keypoints + 0.5, atol=1e-4)
        for m in scene.matches:
            np.testing.assert_array_equal(db.read_matches(ids[m.name0], ids[m.name1]), m.matches)
            swapped = db.read_matches(ids[m.name1], ids[m.name0])
            np.testing.assert_array_equal(swapped, m.matches[:, ::-1])
        assert db.num_matched_image_pairs() == len(scene.matches)
    back = colmap_db.existing_keypoints(db_path)
    assert set(back) == set(scene.names)
    for name, kp in scene.keypoints.items():
        np.testing.assert_allclose(back[name], kp.keypoints, atol=1e-4)
    assert colmap_db.existing_pairs(db_path) == {frozenset(m.pair) for m in scene.matches}

    # Re-run: same ids, nothing rewritten, no new camera; a new image joins the single camera.
    assert colmap_db.import_images(db_path, scene.image_dir, scene.names[::-1]) == ids
    assert colmap_db.write_keypoints(db_path, ids, scene.keypoints) == 0
    assert colmap_db.write_matches(db_path, ids, scene.matches) == 0
    flipped = [IndexMatches(m.name1, m.name0, m.matches[:, ::-1], m.scores) for m in scene.matches[:3]]
    assert colmap_db.write_matches(db_path, ids, flipped) == 0
    Image.new("RGB", (W, H)).save(scene.image_dir / "extra.png")
    ids2 = colmap_db.import_images(db_path, scene.image_dir, scene.names + ["extra.png"])
    assert ids2["extra.png"] == len(scene.names) + 1 and all(ids2[n] == ids[n] for n in scene.names)
    with colmap_db.open_database(db_path) as db:
        assert db.num_cameras() == 1 and db.read_image(ids2["extra.png"]).camera_id == 1

    # Changed keypoints of a stored image, bad names and bad indices are refused.
    name = scene.names[0]
    moved = ImageKeypoints(name, scene.keypoints[name].keypoints + 1.0)
    with pytest.raises(ValueError, match="different keypoints"):
        colmap_db.write_keypoints(db_path, ids, {name: moved})
    with pytest.raises(ValueError, match="already has"):
        colmap_db.write_keypoints(db_path, ids, {name: ImageKeypoints(name, moved.keypoints[:-1])})
    with pytest.raises(ValueError, match="nope.png"):
        colmap_db.write_keypoints(db_path, ids, {"nope.png": moved})
    with pytest.raises(ValueError, match="no keypoints"):
        colmap_db.write_matches(db_path, ids2, [IndexMatches(name, "extra.png", [[0, 0]], [1.0])])
    colmap_db.write_keypoints(db_path, None, {"extra.png": ImageKeypoints("extra.png", [[1.0, 2.0]])})
    with pytest.raises(ValueError, match="out of range"):
        colmap_db.write_matches(db_path, None, [IndexMatches(name, "extra.png", [[0, 1]], [1.0])])


def test_verify_matches_gives_real_geometries(scene: Scene, tmp_path: Path) -> None:
    db_path = tmp_path / "db.db"
    ids = build_database(scene, db_path)
    pairs = [m.pair for m in scene.matches]
    result = verify_matches(db_path, pairs)
    assert set(result) == set(pairs)
    with colmap_db.open_database(db_path) as db:
        assert db.num_verified_image_pairs() == len(pairs)
        for m in scene.matches:
            tvg = db.read_two_view_geometry(ids[m.name0], ids[m.name1])
            assert tvg.config == pycolmap.TwoViewGeometryConfiguration.CALIBRATED
            true = {tuple(x) for x in m.matches[scene.inlier_masks[m.pair]]}
            inl = {tuple(x) for x in tvg.inlier_matches}
            assert len(inl) == result[m.pair]
            assert len(inl & true) >= 0.95 * len(true)       # most true matches kept
            assert len(inl - true) <= 0.02 * len(true)       # few outliers accepted
    # Second call: everything already verified, nothing changes.
    assert verify_matches(db_path, None) == {p if ids[p[0]] < ids[p[1]] else p[::-1]: n
                                                       for p, n in result.items()}


def test_camera_modes(tmp_path: Path) -> None:
    names = ["a/1.png", "a/2.png", "b/1.png", "b/2.png", "c.png"]
    for n in names:
        (tmp_path / n).parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 48)).save(tmp_path / n)
    expected = {"single": 1, "per-folder": 3, "per_image": 5, "PER-FOLDER": 3}
    for mode, n_cams in expected.items():
        db_path = tmp_path / f"{mode}.db"
        ids = colmap_db.import_images(db_path, tmp_path, names, camera_mode=mode, camera_model="PINHOLE")
        with colmap_db.open_database(db_path) as db:
            assert db.num_cameras() == n_cams, mode
            cams = {n: db.read_image(i).camera_id for n, i in ids.items()}
            cam = db.read_camera(cams["c.png"])
            np.testing.assert_allclose(cam.params, [1.2 * 64, 1.2 * 64, 32, 24])
            assert not cam.has_prior_focal_length
        if mode == "per-folder":
            assert cams["a/1.png"] == cams["a/2.png"] != cams["b/1.png"] == cams["b/2.png"] != cams["c.png"]
    with pytest.raises(ValueError, match="camera_mode"):
        colmap_db.import_images(tmp_path / "x.db", tmp_path, names, camera_mode="per-fodler")
    with pytest.raises(ValueError, match="camera_model"):
        colmap_db.import_images(tmp_path / "x.db", tmp_path, names, camera_model="PINHOL")
    with pytest.raises(ValueError, match="missing.png"):
        colmap_db.import_images(tmp_path / "x.db", tmp_path, ["missing.png"])
    with pytest.raises(ValueError, match="parameters"):
        colmap_db.import_images(tmp_path / "x.db", tmp_path, names, intrinsics="1,2,3")
    with pytest.raises(ValueError, match="does not exist"):
        colmap_db.import_images(tmp_path / "no" / "x.db", tmp_path, names)
    Image.new("RGB", (60, 48)).save(tmp_path / "a" / "3.png")
    with pytest.raises(ValueError, match="a/3.png"):
        colmap_db.import_images(tmp_path / "y.db", tmp_path, names + ["a/3.png"], camera_mode="per-folder")


def test_exif_focal_prior_and_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6                                  # rotated 90°: stored 640x480, shown 480x640
    exif.get_ifd(0x8769)[0xA405] = 50                 # FocalLengthIn35mmFilm
    Image.new("RGB", (W, H)).save(tmp_path / "exif.jpg", exif=exif.tobytes())
    Image.new("RGB", (W, H)).save(tmp_path / "plain.jpg")
    info = read_image_info(tmp_path / "exif.jpg")
    # The stored size, as COLMAP reads the file (it ignores the orientation; keypoints are in this frame).
    colmap_cam = pycolmap.infer_camera_from_image(str(tmp_path / "exif.jpg"))
    assert (info.width, info.height) == (colmap_cam.width, colmap_cam.height) == (W, H)
    assert info.focal_source == "exif-35mm"
    expected_f = colmap_cam.mean_focal_length()
    assert info.focal == pytest.approx(expected_f, rel=1e-6)   # COLMAP's own EXIF rule

    ids = colmap_db.import_images(tmp_path / "db.db", tmp_path, ["exif.jpg", "plain.jpg"],
                                  camera_mode="per-image")
    with colmap_db.open_database(tmp_path / "db.db") as db:
        cam = db.read_camera(db.read_image(ids["exif.jpg"]).camera_id)
        assert (cam.width, cam.height) == (W, H) and cam.has_prior_focal_length
        assert cam.mean_focal_length() == pytest.approx(expected_f, rel=1e-6)
        np.testing.assert_allclose([cam.principal_point_x, cam.principal_point_y], [W / 2, H / 2])
        cam = db.read_camera(db.read_image(ids["plain.jpg"]).camera_id)
        assert not cam.has_prior_focal_length and cam.mean_focal_length() == pytest.approx(1.2 * W)


# ----------------------------------------------------------------------------------------------
# hloc HDF5 files
# ----------------------------------------------------------------------------------------------


def test_h5_features_round_trip_and_layout(scene: Scene, tmp_path: Path) -> None:
    path = tmp_path / "features.h5"
    hloc_h5.write_features(path, scene.keypoints, scene.sizes, uncertainty=0.5)
    assert not list(tmp_path.glob(".*.tmp"))
    assert hloc_h5.list_h5_names(path) == sorted(scene.names)
    back = hloc_h5.read_features(path)
    for name, kp in scene.keypoints.items():
        np.testing.assert_allclose(back[name].keypoints, kp.keypoints, atol=1e-4)
        np.testing.assert_array_equal(back[name].scores, kp.scores)
    with h5py.File(path, "r") as f:                    # hloc's layout, read with plain h5py
        assert isinstance(f["seq"], h5py.Group) and isinstance(f["seq/img00.png"], h5py.Group)
        grp = f[scene.names[0]]
        assert set(grp) == {"keypoints", "scores", "image_size"}
        assert grp["keypoints"].dtype == np.float32 and grp["keypoints"].shape == (len(scene.keypoints[scene.names[0]]), 2)
        assert grp["scores"].dtype == np.float32
        assert grp["image_size"].dtype == np.int64 and list(grp["image_size"][()]) == [W, H]
        assert grp["keypoints"].attrs["uncertainty"] == 0.5
    # Append mode: rewriting one image replaces it and keeps the others.
    name = scene.names[1]
    hloc_h5.write_features(path, [ImageKeypoints(name, [[1.0, 2.0]])])
    back = hloc_h5.read_features(path)
    assert len(back) == len(scene.names) and back[name].keypoints.tolist() == [[1.0, 2.0]]
    with h5py.File(path, "r") as f:
        assert "image_size" not in f[name]


def test_h5_matches_layout_and_find_pair(scene: Scene, tmp_path: Path) -> None:
    path = tmp_path / "matches.h5"
    nkps = {n: len(k) for n, k in scene.keypoints.items()}
    hloc_h5.write_matches(path, scene.matches, nkps)
    m = scene.matches[0]
    key = hloc_h5.names_to_pair(m.name0, m.name1)
    assert key == m.name0.replace("/", "-") + "/" + m.name1.replace("/", "-")
    assert hloc_h5.names_to_pair_old(m.name0, m.name1) == key.replace("/", "_", 1)
    with h5py.File(path, "r") as f:
        grp = f[key]
        assert isinstance(f[m.name0.replace("/", "-")], h5py.Group)
        assert grp["matches0"].dtype == np.int32 and grp["matches0"].shape == (nkps[m.name0],)
        assert grp["matching_scores0"].dtype == np.float32  # float16 overflows MASt3R's scores
        matches0 = grp["matches0"][()]
        assert (matches0 == -1).sum() == nkps[m.name0] - len(m)
        np.testing.assert_array_equal(matches0[m.matches[:, 0]], m.matches[:, 1])
        np.testing.assert_array_equal(grp["matching_scores0"][()][m.matches[:, 0]], m.scores.astype(np.float32))
        assert set(grp["matching_scores0"][()][matches0 == -1]) <= {0}
    assert hloc_h5.list_h5_names(path) == sorted(hloc_h5.names_to_pair(*x.pair) for x in scene.matches)

    def same(got: IndexMatches, want: IndexMatches) -> None:
        order_got, order_want = np.argsort(got.matches[:, 0]), np.argsort(want.matches[:, 0])
        np.testing.assert_array_equal(got.matches[order_got], want.matches[order_want])
        np.testing.assert_allclose(got.scores[order_got], want.scores[order_want], atol=1e-3)

    same(hloc_h5.read_matches(path, m.name0, m.name1), m)                      # new form
    rev = hloc_h5.read_matches(path, m.name1, m.name0)                         # new form, reversed
    assert rev.pair == (m.name1, m.name0)
    same(rev, IndexMatches(m.name1, m.name0, m.matches[:, ::-1], m.scores))
    old = tmp_path / "old.h5"                                                  # old "_" form
    with h5py.File(path, "r") as src, h5py.File(old, "w") as dst:
        src.copy(src[key], dst, name=hloc_h5.names_to_pair_old(m.name0, m.name1))
    same(hloc_h5.read_matches(old, m.name0, m.name1), m)
    same(hloc_h5.read_matches(old, m.name1, m.name0), IndexMatches(m.name1, m.name0, m.matches[:, ::-1], m.scores))
    with pytest.raises(KeyError, match="not found"):
        hloc_h5.read_matches(path, m.name0, "nope.png")

    # match_dense-style length (max idx0 + 1) and append with per-pair overwrite.
    short = IndexMatches(m.name0, m.name1, [[3, 7], [1, 2]], [0.5, 0.25])
    hloc_h5.write_matches(path, [short])
    with h5py.File(path, "r") as f:
        assert f[key]["matches0"][()].tolist() == [-1, 2, -1, 7]
    same(hloc_h5.read_matches(path, m.name0, m.name1), short)
    assert len(hloc_h5.list_h5_names(path)) == len(scene.matches)
    with pytest.raises(ValueError, match="matched twice"):
        hloc_h5.write_matches(path, [IndexMatches("a", "b", [[0, 1], [0, 2]], [1, 1])])
    with pytest.raises(ValueError, match="out of range"):
        hloc_h5.write_matches(path, [IndexMatches("a", "b", [[5, 1]], [1])], {"a": 5})
