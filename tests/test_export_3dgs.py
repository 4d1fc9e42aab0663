"""The Gaussian-Splatting hand-off: ``export_3dgs`` writes COLMAP's undistorted layout (``images/`` +
``sparse/0/``, PINHOLE cameras) whose images, cameras and points agree, on a synthetic model with real
distortion (SIMPLE_RADIAL and OPENCV), subfolder names and an EXIF-rotated JPEG.

The pictures are ramps (red = column, green = row, blue = the image's own value), so that where the
undistorted pixel of an image comes from in the original can be read off its colour.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image

from mast3r_colmap import cli
from mast3r_colmap.export_3dgs import check_output, export_3dgs, main
from mast3r_colmap.mapping import MARKER_FILE
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene

SIZE = (256, 192)
NAMES = ["seq0/cam_000.png", "seq0/cam_001.jpg", "seq1/cam_002.png", "seq1/cam_003.png"]
ROTATED = "seq0/cam_001.jpg"   # stored un-rotated with EXIF orientation 6, as phones do
#: camera 1 (seq0) SIMPLE_RADIAL, camera 2 (seq1) OPENCV; both clearly distorted
CAMERAS = {1: ("SIMPLE_RADIAL", lambda f: [f, 128.0, 96.0, -0.08]),
           2: ("OPENCV", lambda f: [f, 1.02 * f, 126.0, 97.0, 0.06, -0.02, 0.001, -0.0015])}
MAX_OBSERVATION_PX = 0.01     # COLMAP undistorts the 2D points exactly (measured ~1e-7 px)
#: grey levels (a ramp step is 1-1.3 levels per pixel): PNG only rounds (measured 0.5); the JPEG is written
#: twice (by COLMAP at quality 100 with 4:2:0 chroma, then without its orientation tag; measured 3.5)
MAX_RAMP_ERROR = {".png": 1.0, ".jpg": 5.0}


def _ramp(index: int) -> np.ndarray:
    W, H = SIZE
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 255 / (W - 1), y * 255 / (H - 1), np.full(x.shape, 40 * index + 20)], -1).round().astype(
        np.uint8)


def _write_pictures(folder: Path) -> None:
    for i, name in enumerate(NAMES):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == ROTATED:
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.fromarray(_ramp(i)).save(path, exif=exif, quality=95)
        else:
            Image.fromarray(_ramp(i)).save(path)


def _distorted_model() -> pycolmap.Reconstruction:
    """The scene's true model with distorted cameras; every observation is the exact distorted projection."""
    base = SyntheticScene.make(num_cameras=4, image_size=SIZE, seed=0, kind="planes", subfolders=2)
    scene = dataclasses.replace(base, names=list(NAMES), _points={})
    rec = scene.true_model(scene.names, stride=16)
    for cam_id, cam in rec.cameras.items():
        model, params = CAMERAS[cam_id]
        focal = cam.params[0]
        cam.model, cam.params = model, params(focal)
    for image in rec.images.values():
        cam, pose = rec.cameras[image.camera_id], image.cam_from_world()
        for p2d in image.points2D:
            p2d.xy = cam.img_from_cam(pose * rec.points3D[p2d.point3D_id].xyz)
    return rec


def _observation_errors(rec: pycolmap.Reconstruction) -> np.ndarray:
    return np.array([np.linalg.norm(rec.cameras[img.camera_id].img_from_cam(img.cam_from_world() * point.xyz)
                                    - img.points2D[el.point2D_idx].xy)
                     for point in rec.points3D.values() for el in point.track.elements
                     for img in [rec.images[el.image_id]]])


def _undistorted(xy: np.ndarray, distorted: pycolmap.Camera, undistorted: pycolmap.Camera) -> np.ndarray:
    """COLMAP pixels (N, 2) of a distorted camera mapped to those of its undistorted camera."""
    rays = distorted.cam_from_img(xy)
    return undistorted.img_from_cam(np.c_[rays, np.ones(len(rays))])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Pictures, the distorted model (``model/``) and its export (``3dgs/``)."""
    pycolmap.logging.minloglevel = 2
    root = tmp_path_factory.mktemp("export_3dgs")
    _write_pictures(root / "images")
    rec = _distorted_model()
    (root / "model").mkdir()
    rec.write(str(root / "model"))
    out = export_3dgs(root / "model", root / "images", root / "3dgs")
    return root, rec, out


def test_layout_and_pinhole_cameras(world) -> None:
    root, original, out = world
    assert out == root / "3dgs"
    assert sorted(p.name for p in out.iterdir()) == ["images", MARKER_FILE, "sparse"]
    assert sorted(p.name for p in (out / "sparse").iterdir()) == ["0"]
    for stem in ("cameras", "images", "points3D"):
        assert (out / "sparse" / "0" / f"{stem}.bin").is_file()
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    assert {cam.model.name for cam in rec.cameras.values()} == {"PINHOLE"}
    assert sorted(img.name for img in rec.images.values()) == sorted(NAMES)
    assert rec.num_reg_images() == 4 and rec.num_points3D() == original.num_points3D() > 300
    files = sorted(str(p.relative_to(out / "images")) for p in (out / "images").rglob("*") if p.is_file())
    assert files == sorted(NAMES)
    for img in rec.images.values():
        cam = rec.cameras[img.camera_id]
        with Image.open(out / "images" / img.name) as im:
            assert im.size == (cam.width, cam.height), img.name
    # undistortion really happened: the images changed size, the focal lengths stayed
    sizes = {(cam.width, cam.height) for cam in rec.cameras.values()}
    assert SIZE not in sizes
    assert rec.cameras[2].params[0] == pytest.approx(original.cameras[2].params[0])
    assert rec.cameras[2].params[1] == pytest.approx(1.02 * original.cameras[2].params[0])
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["export"] == "3dgs" and marker["files"] == ["images", "sparse"]
    assert (marker["num_images"], marker["num_cameras"], marker["num_points3D"]) == (4, 2, rec.num_points3D())


def test_points_reproject_onto_their_observations(world) -> None:
    root, original, out = world
    assert _observation_errors(original).max() < 1e-9  # the input is consistent with its distorted cameras
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    errors = _observation_errors(rec)
    assert len(errors) == sum(p.track.length() for p in original.points3D.values())
    assert errors.max() < MAX_OBSERVATION_PX
    # each stored observation is the original (distorted) one through the undistortion, and nothing moved
    for img_id, img in rec.images.items():
        before = original.images[img_id]
        assert img.name == before.name and img.num_points2D() == before.num_points2D()
        assert np.allclose(img.cam_from_world().matrix(), before.cam_from_world().matrix())
        dist, undist = original.cameras[before.camera_id], rec.cameras[img.camera_id]
        xy0 = np.array([p.xy for p in before.points2D])
        xy = np.array([p.xy for p in img.points2D])
        assert np.abs(_undistorted(xy0, dist, undist) - xy).max() < MAX_OBSERVATION_PX
        assert np.abs(xy - xy0).max() > 1.0  # the distortion is real
    for pid, point in rec.points3D.items():
        assert np.allclose(point.xyz, original.points3D[pid].xyz)


def _bilinear(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample (N, 2) hloc pixel positions (centre of the top-left pixel at 0) of an (H, W, C) image."""
    x0, y0 = np.floor(xy[:, 0]).astype(int), np.floor(xy[:, 1]).astype(int)
    ax, ay = (xy[:, 0] - x0)[:, None], (xy[:, 1] - y0)[:, None]
    img = img.astype(np.float64)
    return ((1 - ay) * ((1 - ax) * img[y0, x0] + ax * img[y0, x0 + 1])
            + ay * ((1 - ax) * img[y0 + 1, x0] + ax * img[y0 + 1, x0 + 1]))


def test_pixels_follow_the_cameras_in_the_stored_frame(world) -> None:
    """Each undistorted pixel holds the colour of the original picture where its ray meets the distorted
    camera, in the stored pixels (the EXIF-rotated JPEG too, whose orientation tag is then dropped)."""
    root, original, out = world
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    for img in rec.images.values():
        with Image.open(out / "images" / img.name) as im:
            assert im.getexif().get(0x0112, 1) == 1, img.name
            pixels = np.asarray(im.convert("RGB"))
        undist, dist = rec.cameras[img.camera_id], original.cameras[img.camera_id]
        rows, cols = np.mgrid[0:undist.height:4, 0:undist.width:4]
        uv = np.stack([cols.ravel(), rows.ravel()], 1) + 0.5                      # COLMAP pixel centres
        rays = undist.cam_from_img(uv)
        xy = dist.img_from_cam(np.c_[rays, np.ones(len(rays))]) - 0.5           # hloc pixels of the original
        inside = (xy >= 1).all(1) & (xy[:, 0] <= SIZE[0] - 2) & (xy[:, 1] <= SIZE[1] - 2)
        assert inside.mean() > 0.9
        with Image.open(root / "images" / img.name) as im:
            stored = np.asarray(im.convert("RGB"))                               # no EXIF transpose
        expected = _bilinear(stored, xy[inside])
        got = pixels[rows.ravel()[inside], cols.ravel()[inside]].astype(np.float64)
        assert np.abs(got - expected).max() <= MAX_RAMP_ERROR[Path(img.name).suffix], img.name
    with Image.open(root / "images" / ROTATED) as im:
        assert im.getexif()[0x0112] == 6  # the input is left as it was


def test_legacy_readers_see_the_pinhole_model(world, hloc) -> None:
    """The model reads with COLMAP's classic Python reader (the reader 3DGS trainers copy)."""
    from hloc.utils.read_write_model import read_model

    _, _, out = world
    cameras, images, points = read_model(str(out / "sparse" / "0"), ext=".bin")
    assert {c.model for c in cameras.values()} == {"PINHOLE"}
    assert sorted(i.name for i in images.values()) == sorted(NAMES)
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    for img_id, img in images.items():
        assert np.allclose(img.tvec, rec.images[img_id].cam_from_world().translation)
    assert len(points) == rec.num_points3D()


def test_command_line_and_refusals(world, tmp_path, caplog) -> None:
    root, original, _ = world
    out = tmp_path / "splat" / "scene"
    with caplog.at_level(logging.INFO):
        assert main([root / "model", root / "images", out, "--undistort-options", "max_image_size=128",
                     "--no-progress"]) == 0
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    assert max(max(c.width, c.height) for c in rec.cameras.values()) == 128
    marker = (out / MARKER_FILE).read_text()
    # a second export into it: refused without --overwrite, nothing touched
    assert main([root / "model", root / "images", out]) == cli.EXIT_BAD_INPUT
    assert "already holds an export" in caplog.text and (out / MARKER_FILE).read_text() == marker
    (out / "sparse" / "0" / "points3D.ply").write_bytes(b"a trainer's cache")  # inside our folders: replaced
    assert main([root / "model", root / "images", out, "--overwrite"]) == 0
    assert not (out / "sparse" / "0" / "points3D.ply").exists()
    cameras = pycolmap.Reconstruction(str(out / "sparse" / "0")).cameras.values()
    assert max(max(c.width, c.height) for c in cameras) > 128  # the new export, at full size
    # a file of someone else beside our folders: never replaced
    (out / "notes.txt").write_text("mine")
    caplog.clear()
    assert main([root / "model", root / "images", out, "--overwrite"]) == cli.EXIT_BAD_INPUT
    assert "not an export of mast3r-colmap" in caplog.text and (out / "notes.txt").read_text() == "mine"
    # bad input: exit 2 with one message each
    missing_one = tmp_path / "some_images"
    _write_pictures(missing_one)
    (missing_one / NAMES[2]).unlink()
    for argv, message in [
        ([tmp_path / "nothing", root / "images", tmp_path / "a"], "is not a folder"),
        ([root / "model", missing_one, tmp_path / "b"], f"1 image(s) of the model are not in {str(missing_one)!r}: "
                                                        f"'{NAMES[2]}'"),
        ([root / "model", root / "images", root / "images" / "3dgs"], "is inside the image folder"),
        ([root / "model", root / "images", root], "holds the model"),
        ([root / "model", root / "images", root / "images" / NAMES[0]], "is a file"),
        ([root / "model", root / "images", tmp_path / "c", "--undistort-options", "max_scale=big"], "max_scale"),
    ]:
        caplog.clear()
        assert main(argv) == cli.EXIT_BAD_INPUT, argv
        assert message in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    # the Python function takes a Reconstruction too; SIMPLE_PINHOLE (kept by COLMAP) becomes PINHOLE
    pinhole = pycolmap.Reconstruction(original)
    f, cx, cy = pinhole.cameras[1].params[:3]
    pinhole.cameras[1].model, pinhole.cameras[1].params = "SIMPLE_PINHOLE", [f, cx, cy]
    pinhole.cameras[2].model, pinhole.cameras[2].params = "PINHOLE", [f, 1.1 * f, cx, cy]
    assert export_3dgs(pinhole, root / "images", tmp_path / "mem") == tmp_path / "mem"
    assert json.loads((tmp_path / "mem" / MARKER_FILE).read_text())["model"] is None
    rec = pycolmap.Reconstruction(str(tmp_path / "mem" / "sparse" / "0"))
    assert [(c.model.name, c.width, c.height, list(c.params)) for _, c in sorted(rec.cameras.items())] == [
        ("PINHOLE", *SIZE, [f, f, cx, cy]), ("PINHOLE", *SIZE, [f, 1.1 * f, cx, cy])]
    assert original.cameras[1].model.name == "SIMPLE_RADIAL"  # the caller's model is not changed
    check_output(tmp_path / "new" / "folder")  # missing: fine, and nothing created
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem", "some_images", "splat"]  # no scratch left
    assert sorted(p.name for p in (tmp_path / "splat").iterdir()) == ["scene"]


def test_run_export_3dgs(tmp_path, caplog, monkeypatch, capsys) -> None:
    """``mast3r-colmap IMAGES DB --export-3dgs DIR`` with the synthetic oracle as the network (matched at 160
    px, as tests/test_hloc_api.py): the model of the run, undistorted; a re-run replaces the export."""
    from conftest import run_main
    from mast3r_colmap.matching import matcher

    scene = SyntheticScene.make(num_cameras=4, image_size=(320, 240), seed=1, kind="planes", arc_deg=40)
    scene.write_images(tmp_path / "images")
    monkeypatch.setattr(cli, "load_network", lambda args, device=None: SyntheticNetwork(scene))
    get_config = matcher.get_config
    monkeypatch.setattr(matcher, "get_config", lambda name, **kw: get_config(name, **{"image_size": 160, **kw}))
    out = tmp_path / "3dgs"
    argv = [tmp_path / "images", tmp_path / "db.db", "--pairs", "sequential:1", "--export-3dgs", out]
    # refused before any matching: no model without a mapper, and a folder of someone else
    code, log = run_main([*argv, "--mapper", "none"], caplog)
    assert code == cli.EXIT_BAD_INPUT and "--export-3dgs needs a model: not with --mapper none" in log
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    code, log = run_main([*argv[:-1], tmp_path / "other"], caplog)
    assert code == cli.EXIT_BAD_INPUT and "not an export of mast3r-colmap" in log
    assert not (tmp_path / "db.db").exists() and (tmp_path / "other" / "x.txt").read_text() == "mine"
    capsys.readouterr()
    for _ in range(2):  # a re-run (resumed from the database) replaces its own export
        code, log = run_main(argv, caplog)
        assert code == 0, log
        summary = json.loads(capsys.readouterr().out)
        assert summary["num_registered_images"] == 4 and summary["export_3dgs"] == str(out)
    model = pycolmap.Reconstruction(str(tmp_path / "sparse"))
    assert {c.model.name for c in model.cameras.values()} == {"SIMPLE_RADIAL"}
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    assert {c.model.name for c in rec.cameras.values()} == {"PINHOLE"} and rec.num_reg_images() == 4
    assert rec.num_points3D() == model.num_points3D() > 100
    for img_id, img in rec.images.items():
        cam = rec.cameras[img.camera_id]
        with Image.open(out / "images" / img.name) as im:
            assert im.size == (cam.width, cam.height)
        before = model.images[img_id]
        xy0 = np.array([p.xy for p in before.points2D])
        xy = np.array([p.xy for p in img.points2D])
        assert np.abs(_undistorted(xy0, model.cameras[before.camera_id], cam) - xy).max() < MAX_OBSERVATION_PX
    # the residuals of bundle adjustment stay what they were (up to the local scale of the undistortion)
    assert _observation_errors(rec).mean() == pytest.approx(_observation_errors(model).mean(), rel=0.02)
