"""The COLMAP pixel frame: keypoints, camera sizes and intrinsics are in the frame of the *stored* pixels
(EXIF orientation ignored, as ``pycolmap.import_images`` and hloc read files), while the network sees the
upright (EXIF-transposed) image."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pycolmap
import pytest
from PIL import Image, ImageOps

from mast3r_colmap.images import (load_image, load_original, read_image_size, stored_to_upright,
                                  upright_to_stored, validate_image)
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.pipeline import PipelineConfig, reconstruct
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene, pixel_grid, pose_errors

MAX_ROTATION_DEG = 0.5   # as tests/test_pipeline_synthetic.py
MAX_CENTER_REL = 0.01


def _save(arr: np.ndarray, path: Path, orientation: int) -> None:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_maps_match_exif_transpose(tmp_path: Path, orientation: int) -> None:
    """Pixel (u, v) of the upright image is stored pixel upright_to_stored((u, v)), for all 8 orientations."""
    Ws, Hs = 7, 4
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (Hs, Ws, 3), dtype=np.uint8)
    path = tmp_path / f"o{orientation}.png"
    _save(stored, path, orientation)
    with Image.open(path) as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    Hu, Wu = upright.shape[:2]
    uv = pixel_grid(Wu, Hu).reshape(-1, 2)
    xy = upright_to_stored(uv, orientation, (Ws, Hs))
    np.testing.assert_array_equal(xy, np.rint(xy))
    ix = xy.astype(np.int64)
    np.testing.assert_array_equal(stored[ix[:, 1], ix[:, 0]], upright.reshape(-1, 3))
    np.testing.assert_array_equal(stored_to_upright(xy, orientation, (Ws, Hs)), uv)
    # the readers: stored size; the full-resolution image (coarse-to-fine) is upright
    assert read_image_size(path) == validate_image(path) == (Ws, Hs)
    assert np.array_equal(np.rint((load_original(path)[0].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255), upright)


@pytest.mark.parametrize("orientation", [3, 6, 8, 5])
def test_loaded_image_maps_to_the_stored_frame(tmp_path: Path, orientation: int) -> None:
    """The network image is upright (the same as for the untagged upright file); ``to_original`` ends in the
    stored frame: the untagged map followed by the orientation map, and ``to_network`` is its inverse."""
    upright = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    _save(upright, tmp_path / "plain.png", 1)
    plain = load_image(tmp_path / "plain.png", size=64)
    stored_size = (60, 90) if orientation >= 5 else (90, 60)
    uv = pixel_grid(90, 60).reshape(-1, 2)
    xy = upright_to_stored(uv, orientation, stored_size).astype(np.int64)
    stored = np.empty((stored_size[1], stored_size[0], 3), np.uint8)
    stored[xy[:, 1], xy[:, 0]] = upright.reshape(-1, 3)
    _save(stored, tmp_path / "tagged.png", orientation)
    li = load_image(tmp_path / "tagged.png", size=64)
    assert li.orientation == orientation and li.original_size == stored_size and li.upright_size == (90, 60)
    assert li.network_size == plain.network_size and li.img.equal(plain.img)
    net = np.random.default_rng(1).uniform(-1, 64, (100, 2))
    np.testing.assert_allclose(li.to_original(net),
                               upright_to_stored(plain.to_original(net), orientation, stored_size), atol=1e-12)
    np.testing.assert_allclose(li.to_network(li.to_original(net)), net, atol=1e-9)


def _tagged_scene(orientations: dict[int, int]) -> SyntheticScene:
    """The scene of tests/test_pipeline_synthetic.py (320x240 pictures, matched at 160 px) with EXIF tags."""
    scene = SyntheticScene.make(num_cameras=8, image_size=(320, 240), seed=0, kind="planes")
    return dataclasses.replace(scene, orientations={scene.names[i]: o for i, o in orientations.items()})


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["default", "hires"])
def test_matches_of_a_tagged_file_are_those_of_the_plain_file_rotated(tmp_path: Path, preset: str) -> None:
    """The same photo with and without the tag: the tagged file's matches, mapped through the inverse
    rotation, are the plain file's (coarse images and coarse-to-fine crops alike)."""
    tagged = _tagged_scene({2: 6, 3: 3, 4: 8})
    plain = dataclasses.replace(tagged, orientations={})
    tagged.write_images(tmp_path / "tagged")
    plain.write_images(tmp_path / "plain")
    with Image.open(tmp_path / "tagged" / tagged.names[2]) as im:
        assert im.size == (240, 320) and im.getexif()[0x0112] == 6
    conf = get_config(preset, image_size=160)
    for a, b in [(2, 3), (3, 4)]:
        na, nb = tagged.names[a], tagged.names[b]
        got = Matcher(SyntheticNetwork(tagged), conf, image_dir=tmp_path / "tagged").match_pair(na, nb)
        ref = Matcher(SyntheticNetwork(plain), conf, image_dir=tmp_path / "plain").match_pair(na, nb)
        assert len(ref.scores) > 100
        rows = np.column_stack([tagged.stored_to_render(na, got.xy0), tagged.stored_to_render(nb, got.xy1),
                                got.scores])
        ref_rows = np.column_stack([ref.xy0, ref.xy1, ref.scores])
        np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(ref_rows, axis=0))  # order may differ
        Wa, Ha = tagged.stored_size(na)
        assert ((got.xy0 >= -0.5) & (got.xy0 <= [Wa - 0.5, Ha - 0.5])).all()


@pytest.mark.slow
def test_database_and_hloc_routes_use_the_stored_frame(tmp_path: Path) -> None:
    pycolmap.logging.minloglevel = 2
    scene = _tagged_scene({2: 6, 4: 3, 6: 8})
    images = tmp_path / "images"
    scene.write_images(images)
    matcher = Matcher(SyntheticNetwork(scene), get_config("default", image_size=160), image_dir=images)
    config = PipelineConfig(pairs="sequential:3", camera_model="PINHOLE", progress=False)
    result = reconstruct(images, tmp_path / "database.db", matcher, config, output_dir=tmp_path / "sparse",
                         export_h5=tmp_path / "h5")
    assert result["num_registered_images"] == 8

    # camera sizes: those pycolmap.import_images gives for the same folder
    with pycolmap.Database.open(str(tmp_path / "colmap.db")):  # hloc's create_empty_db
        pass
    pycolmap.import_images(str(tmp_path / "colmap.db"), str(images), pycolmap.CameraMode.PER_IMAGE,
                           options=pycolmap.ImageReaderOptions(camera_model="PINHOLE"))
    with pycolmap.Database.open(str(tmp_path / "colmap.db")) as db:
        expected = {im.name: (db.read_camera(im.camera_id).width, db.read_camera(im.camera_id).height)
                    for im in db.read_all_images()}
    with pycolmap.Database.open(str(tmp_path / "database.db")) as db:
        images_db = {im.name: im for im in db.read_all_images()}
        for name, im in images_db.items():
            cam = db.read_camera(im.camera_id)
            assert (cam.width, cam.height) == expected[name] == scene.stored_size(name), name
            np.testing.assert_allclose([cam.principal_point_x, cam.principal_point_y],
                                       np.asarray(expected[name]) / 2)
        # keypoints (COLMAP's +0.5) of the matches of a tagged image land on the true scene points
        ids = {name: im.image_id for name, im in images_db.items()}
        kps = {name: db.read_keypoints(ids[name])[:, :2].astype(np.float64) - 0.5 for name in ids}
        for n0, n1 in [(scene.names[1], scene.names[2]), (scene.names[2], scene.names[4]),
                       (scene.names[5], scene.names[6])]:
            m = db.read_two_view_geometry(ids[n0], ids[n1]).inlier_matches
            assert len(m) > 100
            xy0, xy1 = kps[n0][m[:, 0]], kps[n1][m[:, 1]]
            true1, ok = scene.true_correspondences(n0, n1, scene.stored_to_render(n0, xy0))
            assert ok.mean() > 0.95
            err = np.linalg.norm(scene.stored_to_render(n1, xy1)[ok] - true1[ok], axis=1)
            assert np.median(err) < 1.0, (n0, n1, np.median(err))

    err = pose_errors(pycolmap.Reconstruction(str(tmp_path / "sparse")), scene)
    assert err["unregistered"] == []
    assert err["max_rotation_deg"] < MAX_ROTATION_DEG, err["rotation_deg"]
    assert err["max_center_rel"] < MAX_CENTER_REL, err["center_rel"]

    # hloc: image_size and keypoints in the stored frame (the database's, less COLMAP's 0.5)
    with h5py.File(tmp_path / "h5" / "features.h5", "r") as f:
        for name in scene.names:
            assert tuple(f[name]["image_size"][()]) == scene.stored_size(name), name
            np.testing.assert_allclose(f[name]["keypoints"][()], kps[name], atol=1e-4)
