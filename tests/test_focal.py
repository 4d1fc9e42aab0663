"""Focal priors from the network: the pointmap fit (mast3r_colmap.focal), the matcher's pass over the encoding
cache (network -> original pixels, EXIF orientation, crops), and the pipeline's cameras: precedence (EXIF >
the user's intrinsics > network > COLMAP's 1.2 max(W, H)), re-runs that never change existing cameras, the
flag, and a wide-angle synthetic scene mapped with the prior."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image

from mast3r_colmap import mapping
from mast3r_colmap.export import focal_priors
from mast3r_colmap.focal import MIN_PIXELS, estimate_focal, image_centre
from mast3r_colmap.matching.dense import MASt3RNetwork
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.pipeline import PipelineConfig, reconstruct
from mast3r_colmap.run import build_parser
from mast3r_colmap.structures import PairMatches
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene, pose_errors
from test_pipeline_synthetic import MAX_CENTER_REL, MAX_ROTATION_DEG

SIZE = (320, 240)          # the synthetic images of the pipeline tests
FOCAL = 0.5 * SIZE[0]      # a wide-angle camera: 90 degrees across
DEFAULT = 1.2 * max(SIZE)  # COLMAP's guess


def render_pointmap(width: int, height: int, focal: float, principal_point=None) -> np.ndarray:
    """(H, W, 3) points of a smooth surface seen by a pinhole camera (hloc pixel centres)."""
    cx, cy = image_centre(width, height) if principal_point is None else principal_point
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    z = 3.0 + np.sin(u / 50.0) + 0.5 * np.cos(v / 30.0)
    return np.stack([(u - cx) * z / focal, (v - cy) * z / focal, z], axis=-1)


# ---- the fit ------------------------------------------------------------------------------------

def test_image_centre_is_the_pixel_centre_convention():
    assert image_centre(512, 384) == (255.5, 191.5)
    assert image_centre(4, 3) == (1.5, 1.0)      # pixels at x = 0..3: the centre lies between 1 and 2


@pytest.mark.parametrize("width, height", [(512, 384), (333, 500)])
def test_ideal_pointmap_gives_its_focal(width, height):
    pts = render_pointmap(width, height, 400.0)
    assert estimate_focal(pts) == pytest.approx(400.0, rel=1e-6)
    assert estimate_focal(1000.0 * pts) == pytest.approx(400.0, rel=1e-6)  # any scale
    # only the bottom-right quarter: a centre off by half a pixel (COLMAP's (W / 2, H / 2) taken for hloc
    # coordinates) biases the focal by some 0.5 % there, where the four quarters cancel the error out
    quarter = np.zeros((height, width))
    quarter[height // 2 + 1:, width // 2 + 1:] = 5.0
    assert estimate_focal(pts, quarter) == pytest.approx(400.0, rel=1e-6)
    shifted = render_pointmap(width, height, 400.0, principal_point=(width / 2, height / 2))
    assert abs(estimate_focal(shifted, quarter) / 400.0 - 1) > 2e-3
    assert estimate_focal(shifted, quarter, principal_point=(width / 2, height / 2)) == pytest.approx(400.0, rel=1e-6)


def test_outliers_and_low_confidence_junk_are_ignored():
    width, height = 512, 384
    rng = np.random.default_rng(0)
    pts = render_pointmap(width, height, 400.0)
    conf = np.full((height, width), 5.0)
    wrong = rng.random((height, width)) < 0.2                              # 20 % confident but wrong points
    pts[wrong] = np.stack([rng.uniform(-3, 3, wrong.sum()), rng.uniform(-3, 3, wrong.sum()),
                           rng.uniform(1, 6, wrong.sum())], axis=-1)
    junk = ~wrong & (rng.random((height, width)) < 0.25)                   # low confidence: anything at all
    pts[junk] = rng.normal(0.0, 10.0, (junk.sum(), 3))
    pts[junk & (rng.random((height, width)) < 0.2)] = np.nan
    pts[junk & (rng.random((height, width)) < 0.2)] = [1e3, 1e3, 1e-9]     # on the image plane: X/Z huge
    conf[junk] = 1.0
    conf[junk & (rng.random((height, width)) < 0.1)] = np.nan
    assert abs(estimate_focal(pts, conf) / 400.0 - 1) < 5e-3
    ok = np.isfinite(pts).all(-1) & (pts[..., 2] > 0) & (conf > 1.5)        # least squares over the same pixels
    v, u = np.nonzero(ok)
    a = np.concatenate([pts[ok][:, 0] / pts[ok][:, 2], pts[ok][:, 1] / pts[ok][:, 2]])
    b = np.concatenate([u - 255.5, v - 191.5])
    assert abs(a @ b / (a @ a) / 400.0 - 1) > 0.05                        # what the L1 fit is there for


def test_bad_pointmaps_are_refused():
    pts = render_pointmap(64, 48, 50.0)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        estimate_focal(pts[..., :2])
    with pytest.raises(ValueError, match="conf must be"):
        estimate_focal(pts, np.ones((48, 63)))
    with pytest.raises(ValueError, match="confident"):
        estimate_focal(pts, np.ones((48, 64)))                            # nothing above min_conf
    with pytest.raises(ValueError, match=f"at least {MIN_PIXELS}"):
        estimate_focal(-pts)                                              # all behind the camera
    few = np.zeros((48, 64))
    few[0, :MIN_PIXELS] = 5.0
    assert estimate_focal(pts, few) == pytest.approx(50.0, rel=1e-6)     # exactly enough


# ---- the matcher: network -> original pixels ----------------------------------------------------------

@pytest.mark.parametrize("size, image_size, orientations", [
    ((384, 288), 192, {"cam_001.png": 6, "cam_002.png": 3}),   # scale 2, EXIF-rotated files
    ((330, 210), 192, {}),                                     # resized to 192x122, cropped to 192x112
])
def test_synthetic_pointmaps_give_the_true_focal_in_original_pixels(tmp_path, size, image_size, orientations):
    scene = SyntheticScene.make(num_cameras=3, image_size=size, seed=1, focal_factor=0.5)
    scene.orientations = dict(orientations)
    scene.write_images(tmp_path)
    matcher = Matcher(SyntheticNetwork(scene), get_config("default", image_size=image_size), image_dir=tmp_path)
    priors = matcher.focal_priors(scene.names)
    assert sorted(priors) == scene.names
    for name, focal in priors.items():
        assert focal == pytest.approx(scene.focals[scene.index(name)], rel=5e-3), name
    assert matcher.encodings.misses == 3
    matcher.match_pair(scene.names[0], scene.names[1])                  # matching reuses the encodings
    assert matcher.encodings.misses == 3


@torch.inference_mode()
def test_mast3r_pointmap_is_view_one_of_the_image_with_itself(small_model):
    enc = small_model.encode(torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    pred = MASt3RNetwork(small_model).pointmap([enc[0], enc[1]])
    expected, _ = small_model.predict(enc, enc, with_pts3d=True)
    assert sorted(pred) == ["conf", "pts3d"]
    torch.testing.assert_close(pred["pts3d"], expected["pts3d"], rtol=0, atol=0)
    torch.testing.assert_close(pred["conf"], expected["conf"], rtol=0, atol=0)


def test_mast3r_pointmaps_through_the_matcher(small_model, images, caplog):
    """One full-head pass per image on the cached encoding; the fit and the scale to original pixels."""
    matcher = Matcher(small_model, get_config("default", image_size=160, num_workers=0), image_dir=images)
    assert isinstance(matcher.network, MASt3RNetwork)
    name = sorted(p.name for p in images.iterdir())[0]
    loaded = matcher.image(name)
    matcher.encodings.get_many([(name, None)], [loaded.img])
    seen = []
    pointmap = matcher.network.pointmap
    matcher.network.pointmap = lambda enc: seen.append(pointmap(enc)) or seen[-1]
    with caplog.at_level(logging.WARNING):
        priors = matcher.focal_priors([name])                          # random weights: a value or a warning
    assert matcher.encodings.misses == 1 and len(seen) == 1             # the cached encoding, one pass
    h, w = loaded.img.shape[-2:]
    pts3d, conf = seen[0]["pts3d"], seen[0]["conf"]
    assert pts3d.shape == (1, h, w, 3) and conf.shape == (1, h, w)
    assert bool((conf >= 1).all())                                     # MASt3R's confidences: 1 + exp(x)
    width, height = loaded.original_size
    centre = loaded.to_network(np.array([[(width - 1) / 2, (height - 1) / 2]]))[0]
    try:
        focal = estimate_focal(pts3d[0].numpy(), conf[0].numpy(), principal_point=tuple(centre)) * np.mean(loaded.scale)
    except ValueError:
        focal = None
    if focal is not None and 0.25 * max(width, height) <= focal <= 10 * max(width, height):
        assert priors == {name: pytest.approx(focal, rel=1e-9)}
    else:
        assert priors == {} and f"{name}: no focal prior" in caplog.text


# ---- the pipeline's cameras ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A wide-angle synthetic scene (focal 0.5 W, SIMPLE_RADIAL, PNGs without EXIF focal)."""
    pycolmap.logging.minloglevel = 2
    scene = SyntheticScene.make(num_cameras=5, image_size=SIZE, seed=0, focal_factor=0.5,
                                camera_model="SIMPLE_RADIAL")
    root = tmp_path_factory.mktemp("wide")
    scene.write_images(root / "images")
    for name in scene.names:
        with Image.open(root / "images" / name) as im:
            assert 0xA405 not in im.getexif() and 0x920A not in im.getexif()
    return scene, root / "images"


class _NoMatches:
    """The matcher's focal priors and settings, but no matches (the camera tests need no mapping)."""

    def __init__(self, scene: SyntheticScene, image_dir: Path):
        self.base = Matcher(SyntheticNetwork(scene), get_config("default", image_size=192), image_dir=image_dir)
        self.estimated: list = []

    def settings(self):
        return self.base.settings()

    def focal_priors(self, names):
        self.estimated.extend(names)
        return self.base.focal_priors(names)

    def match_pairs(self, pairs):
        for a, b in pairs:
            yield PairMatches(a, b, np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0))


def _cameras(db_path: Path) -> dict:
    """{image name: camera} of a database."""
    with pycolmap.Database.open(str(db_path)) as db:
        return {im.name: db.read_camera(im.camera_id) for im in db.read_all_images()}


def _config(**changes) -> PipelineConfig:
    return PipelineConfig(**{"pairs": "sequential:1", "mapper": "none", "progress": False, **changes})


def test_wide_angle_scene_maps_with_the_network_prior(wide, tmp_path):
    scene, images = wide
    matcher = Matcher(SyntheticNetwork(scene), get_config("default", image_size=192), image_dir=images)
    result = reconstruct(images, tmp_path / "db.db", matcher, _config(pairs="sequential:2", mapper="incremental"),
                         output_dir=tmp_path / "sparse")
    err = pose_errors(pycolmap.Reconstruction(str(tmp_path / "sparse")), scene)
    assert err["unregistered"] == [] and len(err["registered"]) == 5
    assert err["max_rotation_deg"] < MAX_ROTATION_DEG and err["max_center_rel"] < MAX_CENTER_REL
    [camera] = result["cameras"]
    assert camera["camera_id"] == 1 and camera["model"] == "SIMPLE_RADIAL" and camera["prior_source"] == "network"
    assert camera["prior_focal"] == pytest.approx(FOCAL, rel=5e-3)
    assert camera["refined_focal"] == pytest.approx(FOCAL, rel=5e-3)
    cam = _cameras(tmp_path / "db.db")[scene.names[0]]
    assert cam.has_prior_focal_length and cam.params[0] == camera["prior_focal"]
    assert list(cam.params[1:]) == [SIZE[0] / 2, SIZE[1] / 2, 0.0]
    assert focal_priors.read(tmp_path / "db.db") == {1: camera["prior_focal"]}


def test_flag_off_gives_colmap_default_and_a_rerun_changes_no_camera(wide, tmp_path):
    scene, images = wide
    db_path = tmp_path / "db.db"
    off = _NoMatches(scene, images)
    reconstruct(images, db_path, off, _config(focal_prior=False), names=scene.names[:3])
    assert off.estimated == []
    first = _cameras(db_path)
    for cam in first.values():
        assert list(cam.params) == [DEFAULT, SIZE[0] / 2, SIZE[1] / 2, 0.0] and not cam.has_prior_focal_length
    # resumed with the prior on and two new images: they join the existing camera (auto: same size, no
    # EXIF), which keeps COLMAP's default
    on = _NoMatches(scene, images)
    reconstruct(images, db_path, on, _config())
    assert on.estimated == scene.names[3:]                             # only the new images are estimated
    cams = _cameras(db_path)
    assert {cam.camera_id for cam in cams.values()} == {1}
    assert list(cams[scene.names[4]].params) == [DEFAULT, SIZE[0] / 2, SIZE[1] / 2, 0.0]
    assert not cams[scene.names[4]].has_prior_focal_length and focal_priors.read(db_path) == {}


def test_rerun_adds_images_to_the_estimated_camera_and_new_cameras_get_their_own(wide, tmp_path):
    scene, images = wide
    db_path = tmp_path / "db.db"
    reconstruct(images, db_path, _NoMatches(scene, images), _config(), names=scene.names[:3])
    [recorded] = focal_priors.read(db_path).values()
    reconstruct(images, db_path, _NoMatches(scene, images), _config(), names=scene.names[:4])
    cams = _cameras(db_path)
    assert {cam.camera_id for cam in cams.values()} == {1}             # auto: joined as in one run
    assert cams[scene.names[3]].params[0] == recorded and focal_priors.read(db_path) == {1: recorded}
    # per image: the existing cameras stay, the new image's camera gets its own estimate
    reconstruct(images, db_path, _NoMatches(scene, images), _config(camera_mode="per-image"))
    cams = _cameras(db_path)
    assert cams[scene.names[4]].camera_id == 2 and cams[scene.names[4]].has_prior_focal_length
    assert cams[scene.names[4]].params[0] == pytest.approx(FOCAL, rel=5e-3)
    assert focal_priors.read(db_path) == {1: recorded, 2: cams[scene.names[4]].params[0]}


def test_exif_and_user_intrinsics_come_first(wide, tmp_path):
    scene, images = wide
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    for name in scene.names[:2]:                                        # 24 mm (35 mm equivalent) in EXIF
        with Image.open(folder / name) as im:
            pixels = im.copy()
        exif = Image.Exif()
        exif[0xA405] = 24
        pixels.save(folder / name, exif=exif)
    exif_focal = 24 * np.hypot(*SIZE) / 43.27
    matcher = _NoMatches(scene, folder)
    reconstruct(folder, tmp_path / "db.db", matcher, _config())
    assert matcher.estimated == scene.names[2:]
    cams = _cameras(tmp_path / "db.db")
    exif_cam, network_cam = cams[scene.names[0]], cams[scene.names[4]]
    assert exif_cam.params[0] == pytest.approx(exif_focal) and exif_cam.has_prior_focal_length
    assert network_cam.params[0] == pytest.approx(FOCAL, rel=5e-3) and network_cam.has_prior_focal_length
    network_id, exif_id = cams[scene.names[4]].camera_id, cams[scene.names[0]].camera_id
    assert focal_priors.read(tmp_path / "db.db") == {network_id: cams[scene.names[4]].params[0]}
    rec = pycolmap.Reconstruction()                                     # the summary tells the sources apart
    for cam in (cams[scene.names[0]], cams[scene.names[4]]):
        rec.add_camera_with_trivial_rig(cam)
    sources = {c["camera_id"]: (c["prior_source"], c["prior_focal"]) for c in
               mapping.camera_focals(rec, tmp_path / "db.db")}
    assert sources == {exif_id: ("exif-or-intrinsics", pytest.approx(exif_focal)),
                       network_id: ("network", cams[scene.names[4]].params[0])}
    # the user's intrinsics, a focal factor of their own or listed cameras: no network pass at all
    for i, changes in enumerate([{"intrinsics": "300,160,120,0"},
                                 {"image_options": {"default_focal_length_factor": 2.0}},
                                 {"camera_intrinsics": {n: pycolmap.Camera(model="SIMPLE_RADIAL", width=SIZE[0],
                                                                           height=SIZE[1], params=[200, 160, 120, 0])
                                                        for n in scene.names}}]):
        matcher = _NoMatches(scene, images)
        reconstruct(images, tmp_path / f"user{i}.db", matcher, _config(**changes))
        assert matcher.estimated == []
        focal = _cameras(tmp_path / f"user{i}.db")[scene.names[4]].params[0]
        assert focal == [300.0, 2.0 * SIZE[0], 200.0][i]


def test_a_matcher_without_focal_priors_leaves_colmap_default(wide, tmp_path, caplog):
    scene, images = wide

    class Plain:
        def __init__(self):
            self.base = _NoMatches(scene, images)
            self.settings, self.match_pairs = self.base.settings, self.base.match_pairs

    with caplog.at_level(logging.DEBUG, logger="mast3r_colmap.pipeline"):
        reconstruct(images, tmp_path / "db.db", Plain(), _config())
    assert "has no focal_priors" in caplog.text
    assert {cam.params[0] for cam in _cameras(tmp_path / "db.db").values()} == {DEFAULT}


def test_command_line_flag():
    args = build_parser().parse_args(["images", "db.db"])
    assert args.focal_prior is True
    assert build_parser().parse_args(["images", "db.db", "--no-focal-prior"]).focal_prior is False
