"""pycolmap's own option objects pass through the Python API and the command line: TwoViewGeometryOptions,
mapper options, CameraMode, ImageReaderOptions, hloc's ``key=value`` option words and per-image intrinsics."""

from __future__ import annotations

import pycolmap
import pytest

from conftest import run_main
from mast3r_colmap.cameras import read_image_info
from mast3r_colmap.export import colmap_db
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.options import parse_option_args
from mast3r_colmap.pipeline import PipelineConfig, reconstruct
from mast3r_colmap.run import EXIT_BAD_INPUT
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene


# ---- key=value words --------------------------------------------------------------------------------


def test_option_words_nest_and_convert():
    parsed = parse_option_args(["mapper.init_min_num_inliers=50", "min_num_matches=20", "mapper.init_max_error=2",
                                "extract_colors=False", "ba_local_backend=CERES", "snapshot_path=/tmp/snap"],
                               pycolmap.IncrementalPipelineOptions)
    assert parsed == {"mapper": {"init_min_num_inliers": 50, "init_max_error": 2.0}, "min_num_matches": 20,
                      "extract_colors": False, "ba_local_backend": "CERES", "snapshot_path": "/tmp/snap"}
    assert isinstance(parsed["mapper"]["init_max_error"], float)
    opts = pycolmap.IncrementalPipelineOptions(parsed)
    assert opts.mapper.init_min_num_inliers == 50 and opts.min_num_matches == 20 and not opts.extract_colors
    assert parse_option_args(["ransac={'max_error': 1.0}", "ransac.confidence=0.9"],
                             pycolmap.TwoViewGeometryOptions) == {"ransac": {"max_error": 1.0, "confidence": 0.9}}


@pytest.mark.parametrize("word, message", [
    ("mapper.bogus=1", "('mapper' has no 'bogus'); known: "),
    ("bogus=1", "unknown IncrementalPipelineOptions option 'bogus'; known: "),
    ("min_num_matches=2.5", "'min_num_matches' takes a value of type int"),
    ("extract_colors=1", "'extract_colors' takes a value of type bool"),
    ("min_num_matches.x=1", "('min_num_matches' has no 'x')"),
    ("min_num_matches", "expected key=value"),
    ("ba_local_backend=NOPE", "takes one of CERES"),
])
def test_bad_option_words(word, message):
    with pytest.raises(ValueError) as info:
        parse_option_args([word], pycolmap.IncrementalPipelineOptions)
    assert message in str(info.value)


def test_config_checks_options_before_running():
    PipelineConfig(mapper_options=pycolmap.IncrementalPipelineOptions(), camera_mode=pycolmap.CameraMode.PER_IMAGE,
                   verification_options=pycolmap.TwoViewGeometryOptions(min_num_inliers=3))
    PipelineConfig(mapper="global", mapper_options=pycolmap.GlobalPipelineOptions())
    for bad in (dict(mapper="global", mapper_options=pycolmap.IncrementalPipelineOptions()),
                dict(mapper_options={"bogus": 1}), dict(verification_options={"min_num_inliers": "x"}),
                dict(verification_options={"ransac": {"bogus": 1}}), dict(camera_mode="nope")):
        with pytest.raises(ValueError):
            PipelineConfig(**bad)


# ---- Python API: synthetic scene ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    pycolmap.logging.minloglevel = 2
    scene = SyntheticScene.make(num_cameras=4, image_size=(320, 240), seed=0, kind="planes")
    root = tmp_path_factory.mktemp("options_scene")
    scene.write_images(root / "images")
    return scene, root


def _matcher(scene, root):
    # 160 px: the pictures halved for the network, as the real photos are (a quarter of the pixels to match)
    return Matcher(SyntheticNetwork(scene), get_config("default", image_size=160), image_dir=root / "images")


def _run(scene_root, tmp_path, **config):
    scene, root = scene_root
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = PipelineConfig(**{"pairs": "sequential:1", "camera_model": "PINHOLE", "progress": False,
                               "mapper": "none", **config})
    return reconstruct(root / "images", tmp_path / "db.db", _matcher(scene, root), config,
                       output_dir=tmp_path / "sparse", store_path=tmp_path / "store.sqlite")


def test_verification_options_pass_through(scene, tmp_path):
    default = _run(scene, tmp_path / "a")
    assert default["num_verified_pairs"] == default["num_pairs"] == 3
    strict = _run(scene, tmp_path / "b", verification_options=pycolmap.TwoViewGeometryOptions(min_num_inliers=10**6))
    assert strict["num_pairs"] == 3 and strict["num_verified_pairs"] == 0
    as_dict = _run(scene, tmp_path / "c", verification_options={"min_num_inliers": 10**6})
    assert as_dict["num_verified_pairs"] == 0


def test_mapper_options_pass_through(scene, tmp_path):
    ok = _run(scene, tmp_path, mapper="incremental")
    assert ok["num_registered_images"] == 4
    # same database (matches reused), a mapper that needs more matches than any pair has: no model
    none = _run(scene, tmp_path, mapper="incremental",
                mapper_options=pycolmap.IncrementalPipelineOptions(min_num_matches=10**6))
    assert none["num_registered_images"] == 0
    none = _run(scene, tmp_path, mapper="incremental", mapper_options={"mapper": {"init_min_num_inliers": 10**6}})
    assert none["num_registered_images"] == 0


def test_camera_mode_and_image_reader_options(scene, tmp_path):
    _, root = scene
    run = _run(scene, tmp_path, camera_mode=pycolmap.CameraMode.PER_IMAGE, camera_model="SIMPLE_RADIAL",
               image_options=pycolmap.ImageReaderOptions(camera_model="PINHOLE", default_focal_length_factor=2.0))
    assert run["num_verified_pairs"] == 3
    with pycolmap.Database.open(str(tmp_path / "db.db")) as db:
        cams = db.read_all_cameras()
        assert len(cams) == 4 == db.num_images()
        for cam in cams:
            assert cam.model == pycolmap.CameraModelId.PINHOLE
            assert cam.params[0] == pytest.approx(2.0 * max(cam.width, cam.height))
    # SINGLE through the enum; camera_params of the reader options fix every camera
    names = sorted(p.name for p in (root / "images").iterdir())
    ids = colmap_db.import_images(tmp_path / "single.db", root / "images", names, pycolmap.CameraMode.SINGLE,
                                  options={"camera_model": "PINHOLE", "camera_params": "300,310,160,120"})
    with pycolmap.Database.open(str(tmp_path / "single.db")) as db:
        cams = db.read_all_cameras()
        assert len(cams) == 1 and list(cams[0].params) == [300, 310, 160, 120] and len(ids) == 4
    with pytest.raises(ValueError, match="conflicts"):
        colmap_db.import_images(tmp_path / "c.db", root / "images", names, camera_model="SIMPLE_PINHOLE",
                                options=pycolmap.ImageReaderOptions(camera_model="PINHOLE"))
    with pytest.raises(ValueError, match="unknown ImageReaderOptions"):
        colmap_db.import_images(tmp_path / "c.db", root / "images", names, options={"bogus": 1})
    # existing_camera_id: every new image on that camera
    with pycolmap.Database.open(str(tmp_path / "existing.db")) as db:
        cam_id = db.write_camera(pycolmap.Camera(model="SIMPLE_PINHOLE", width=320, height=240, params=[250, 160, 120]))
    colmap_db.import_images(tmp_path / "existing.db", root / "images", names, "per-image",
                            options=pycolmap.ImageReaderOptions(existing_camera_id=cam_id))
    with pycolmap.Database.open(str(tmp_path / "existing.db")) as db:
        assert db.num_cameras() == 1 and {im.camera_id for im in db.read_all_images()} == {cam_id}


def test_camera_intrinsics_in_api(scene, tmp_path):
    _, root = scene
    names = sorted(p.name for p in (root / "images").iterdir())
    listed = {names[0]: pycolmap.Camera(model="OPENCV", width=320, height=240,
                                        params=[301, 302, 161, 121, 0.01, -0.02, 0.001, 0.002])}
    _run(scene, tmp_path, camera_mode="single", camera_intrinsics=listed)
    with pycolmap.Database.open(str(tmp_path / "db.db")) as db:
        images = {im.name: im for im in db.read_all_images()}
        cam = db.read_camera(images[names[0]].camera_id)
        assert cam.model == pycolmap.CameraModelId.OPENCV
        assert list(cam.params) == pytest.approx([301, 302, 161, 121, 0.01, -0.02, 0.001, 0.002])
        others = {images[n].camera_id for n in names[1:]}
        assert len(others) == 1 and images[names[0]].camera_id not in others  # single mode for the rest
    # a re-run with other listed intrinsics for a stored image is refused
    listed[names[0]] = pycolmap.Camera(model="PINHOLE", width=320, height=240, params=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="already in the database"):
        _run(scene, tmp_path, camera_mode="single", camera_intrinsics=listed)


# ---- command line ------------------------------------------------------------------------------------


def test_cli_option_words_reach_the_config(images, tmp_path, caplog, monkeypatch, small_pth):
    from mast3r_colmap import pipeline

    seen = {}

    def fake_reconstruct(image_dir, database, matcher, config, **kwargs):
        seen["config"] = config
        return {"num_images": 2, "num_pairs": 1, "num_verified_pairs": 1, "num_registered_images": 2}

    monkeypatch.setattr(pipeline, "reconstruct", fake_reconstruct)
    code, log = run_main([images, tmp_path / "db.db", "--checkpoint", small_pth, "--camera-mode", "PER_FOLDER",
                          "--mapper-options", "mapper.init_min_num_inliers=7", "min_num_matches=9",
                          "--verification-options", "min_num_inliers=30", "ransac.max_error=2"], caplog)
    assert code == 0, log
    config = seen["config"]
    assert config.mapper_options == {"mapper": {"init_min_num_inliers": 7}, "min_num_matches": 9}
    assert config.verification_options == {"min_num_inliers": 30, "ransac": {"max_error": 2.0}}
    assert config.camera_mode == "per-folder"
    code, log = run_main([images, tmp_path / "db2.db", "--checkpoint", small_pth, "--mapper", "global",
                          "--mapper-options", "global_mapper.bogus=1"], caplog)
    assert code == EXIT_BAD_INPUT and "unknown GlobalPipelineOptions option 'global_mapper.bogus'" in log


@pytest.mark.parametrize("words, message", [
    (["--mapper-options", "mapper.bogus=1"], "('mapper' has no 'bogus'); known: "),
    (["--mapper-options", "min_num_matches=1.5"], "'min_num_matches' takes a value of type int"),
    (["--verification-options", "ransac.bogus=1"], "('ransac' has no 'bogus'); known: "),
    (["--verification-options", "min_num_inliers='x'"], "'min_num_inliers' takes a value of type int"),
])
def test_cli_bad_option_words(images, tmp_path, caplog, words, message):
    code, log = run_main([images, tmp_path / "db.db", "--mapper", "none", *words], caplog)
    assert code == EXIT_BAD_INPUT and message in log
    assert not (tmp_path / "db.db").exists()


def test_cli_camera_intrinsics(images, tmp_path, caplog, small_pth, presets_at_256):
    names = sorted(p.name for p in images.iterdir())
    info = read_image_info(images / names[0])
    listing = tmp_path / "intrinsics.txt"
    listing.write_text(f"# hloc query list\n{names[0]} PINHOLE {info.width} {info.height} 1000.5 1001.5 "
                       f"{info.width / 2} {info.height / 2}\n")
    code, log = run_main([images, tmp_path / "db.db", "--checkpoint", small_pth, "--mapper", "none",
                          "--camera-model", "SIMPLE_RADIAL", "--camera-intrinsics", listing], caplog)
    assert code == 0, log
    with pycolmap.Database.open(str(tmp_path / "db.db")) as db:
        images_by_name = {im.name: im for im in db.read_all_images()}
        cam = db.read_camera(images_by_name[names[0]].camera_id)
        assert cam.model == pycolmap.CameraModelId.PINHOLE
        assert list(cam.params) == [1000.5, 1001.5, info.width / 2, info.height / 2]
        other = db.read_camera(images_by_name[names[1]].camera_id)
        assert other.model == pycolmap.CameraModelId.SIMPLE_RADIAL  # not listed: the camera mode's camera

    listing.write_text(f"{names[0]} PINHOLE {info.width + 1} {info.height} 1000 1000 10 10\n")
    code, log = run_main([images, tmp_path / "db2.db", "--checkpoint", small_pth, "--mapper", "none",
                          "--camera-intrinsics", listing], caplog)
    assert code == EXIT_BAD_INPUT and f"{info.width + 1}x{info.height}" in log and "the image is" in log
    assert not (tmp_path / "db2.db").exists()
    listing.write_text(f"{names[0]}\n")
    code, log = run_main([images, tmp_path / "db3.db", "--checkpoint", small_pth, "--mapper", "none",
                          "--camera-intrinsics", listing], caplog)
    assert code == EXIT_BAD_INPUT and "expected 'name MODEL WIDTH HEIGHT PARAMS...'" in log
