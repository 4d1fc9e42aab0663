"""Synthetic scenes: rendering, exact correspondences, the oracle network, ground truth and scoring."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image

from mast3r_colmap.images import LoadedImage, load_image
from mast3r_colmap.testing.synthetic import (DESC_DIM, SyntheticNetwork, SyntheticScene, pixel_grid, pose_errors,
                                             umeyama)

SIZE = (320, 240)


@pytest.fixture(scope="module")
def planes() -> SyntheticScene:
    return SyntheticScene.make(num_cameras=10, image_size=SIZE, seed=0, kind="planes")


@pytest.fixture(scope="module")
def box() -> SyntheticScene:
    return SyntheticScene.make(num_cameras=10, image_size=SIZE, seed=1, kind="box")


def bilinear(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample an (H, W, C) image at hloc coordinates (N, 2) inside [0, W-1] x [0, H-1]."""
    x0 = np.clip(np.floor(xy[:, 0]).astype(int), 0, img.shape[1] - 2)
    y0 = np.clip(np.floor(xy[:, 1]).astype(int), 0, img.shape[0] - 2)
    fx, fy = (xy[:, 0] - x0)[:, None], (xy[:, 1] - y0)[:, None]
    im = img.astype(np.float64)
    return ((1 - fx) * (1 - fy) * im[y0, x0] + fx * (1 - fy) * im[y0, x0 + 1]
            + (1 - fx) * fy * im[y0 + 1, x0] + fx * fy * im[y0 + 1, x0 + 1])


# -- scene layout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["planes", "box"])
def test_layout_overlap_and_structure(kind: str, planes: SyntheticScene, box: SyntheticScene) -> None:
    scene = planes if kind == "planes" else box
    n = len(scene.names)
    ov = np.array([[scene.overlap(a, b, stride=16) if a != b else 1.0 for b in scene.names]
                   for a in scene.names])
    closed = kind == "box"
    for i in range(n):
        assert (np.delete(ov[i], i) >= 0.3).sum() >= 3, (kind, i, ov[i])
        if i + 1 < n or closed:
            assert ov[i, (i + 1) % n] >= 0.5, (kind, i, ov[i])
    # Not planar overall: the points seen by one camera span three dimensions.
    X, valid = scene.points(scene.names[0])
    sv = np.linalg.svd(X[valid][::50] - X[valid][::50].mean(0), compute_uv=False)
    assert sv[2] / sv[0] > 0.1
    assert valid.mean() > 0.4
    assert 3.0 < scene.scene_size < 30.0


def test_names_and_groups() -> None:
    scene = SyntheticScene.make(num_cameras=6, image_size=(64, 48), subfolders=2)
    assert scene.names[0] == "seq0/cam_000.png" and scene.names[-1] == "seq1/cam_005.png"
    assert list(scene.groups) == [0, 0, 0, 1, 1, 1]
    assert scene.focals[0] != scene.focals[-1]
    flat = SyntheticScene.make(num_cameras=3, image_size=(64, 48))
    assert flat.names == ["cam_000.png", "cam_001.png", "cam_002.png"]
    with pytest.raises(ValueError):
        SyntheticScene.make(kind="sphere")


# -- rendering -------------------------------------------------------------------------------------

def test_render_is_deterministic(planes: SyntheticScene) -> None:
    name = planes.names[3]
    img = planes.render(name)
    assert img.shape == (SIZE[1], SIZE[0], 3) and img.dtype == np.uint8
    again = SyntheticScene.make(num_cameras=10, image_size=SIZE, seed=0, kind="planes")
    np.testing.assert_array_equal(again.render(name), img)
    other = SyntheticScene.make(num_cameras=10, image_size=SIZE, seed=5, kind="planes")
    assert np.abs(other.render(name).astype(int) - img).mean() > 10
    # colourful, with contrast
    X, valid = planes.points(name)
    tex = img[valid].astype(np.float64)
    assert tex.std(axis=0).min() > 40
    np.testing.assert_array_equal(img[valid], planes.colors(X[valid]))


def test_views_are_consistent(planes: SyntheticScene) -> None:
    a, b = planes.names[4], planes.names[5]
    rng = np.random.default_rng(0)
    xy_b = rng.uniform([0, 0], [SIZE[0] - 1, SIZE[1] - 1], (3000, 2))
    xy_a, ok = planes.true_correspondences(b, a, xy_b)
    ok &= (xy_a[:, 0] <= SIZE[0] - 1) & (xy_a[:, 1] <= SIZE[1] - 1) & (xy_a >= 0).all(1)
    assert ok.mean() > 0.5
    Xb, _, _ = planes.cast(b, xy_b[ok])
    Xa, hit, _ = planes.cast(a, xy_a[ok])
    assert hit.all()
    np.testing.assert_allclose(Xa, Xb, atol=1e-9 * planes.scene_size)
    # The colour of a 3D point is the same from both views (up to float32 rounding of one level) ...
    assert np.abs(planes.colors(Xa).astype(int) - planes.colors(Xb)).max() <= 1
    # ... and the rendered images agree once resampled (bilinear at sub-pixel positions).
    img_a, img_b = planes.render(a), planes.render(b)
    px = np.round(xy_b[ok]).astype(int)
    xa, va = planes.true_correspondences(b, a, px.astype(np.float64))
    inside = va & (xa >= 0).all(1) & (xa[:, 0] <= SIZE[0] - 1) & (xa[:, 1] <= SIZE[1] - 1)
    diff = np.abs(bilinear(img_a, xa[inside]) - img_b[px[inside, 1], px[inside, 0]])
    shuffled = np.abs(img_b[px[:, 1], px[:, 0]].astype(float)
                      - img_b[px[::-1, 1], px[::-1, 0]].astype(float))
    assert np.median(diff) < 0.2 * np.median(shuffled)


def test_write_images(tmp_path) -> None:
    scene = SyntheticScene.make(num_cameras=4, image_size=(64, 48), subfolders=2)
    names = scene.write_images(tmp_path)
    assert names == scene.names
    for name in names:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / name)), scene.render(name))


# -- exact geometry --------------------------------------------------------------------------------

def test_true_correspondences_round_trip(planes: SyntheticScene) -> None:
    a, b = planes.names[2], planes.names[3]
    rng = np.random.default_rng(1)
    xy0 = rng.uniform([-0.5, -0.5], [SIZE[0] - 0.5, SIZE[1] - 0.5], (5000, 2))
    X, hit, depth = planes.cast(a, xy0)
    xy_back, z = planes.project(a, X[hit])
    np.testing.assert_allclose(xy_back, xy0[hit], atol=1e-6)
    np.testing.assert_allclose(z, depth[hit], rtol=1e-12)
    xy1, valid = planes.true_correspondences(a, b, xy0)
    assert 0.5 < valid.mean() <= hit.mean()
    xy1_proj, _ = planes.project(b, X[valid])
    np.testing.assert_allclose(xy1[valid], xy1_proj, atol=1e-9)
    back, valid_back = planes.true_correspondences(b, a, xy1[valid])
    assert valid_back.all()
    np.testing.assert_allclose(back, xy0[valid], atol=1e-6)
    # Occlusion: points that land inside image b but are not visible are hidden by a nearer surface.
    xy_in, z_in = planes.project(b, np.where(hit[:, None], X, 0.0))
    inside = hit & (z_in > 0) & (np.abs(xy_in - (np.array(SIZE) - 1) / 2) <= np.array(SIZE) / 2).all(1)
    occluded = inside & ~valid
    assert occluded.sum() > 10
    _, _, d_occ = planes.cast(b, xy_in[occluded])
    assert (d_occ < z_in[occluded] - 1e-6).all()


def test_occluded_and_out_of_view_points_are_invalid(box: SyntheticScene) -> None:
    # On a full orbit, opposite cameras see few common points, and sky pixels never correspond.
    a, b = box.names[0], box.names[5]
    X, valid = box.points(a)
    xy1, ok = box.true_correspondences(a, b, pixel_grid(*SIZE).reshape(-1, 2))
    assert not ok[~valid.reshape(-1)].any()
    assert ok.mean() < 0.5


# -- ideal descriptors -----------------------------------------------------------------------------

def encode(network: SyntheticNetwork, images: list) -> list:
    """The network's encodings of loaded images, given as the Matcher gives them (key, map to original)."""
    return network.encode(torch.cat([im.img for im in images]), [(im.name, None) for im in images],
                          [im.to_original for im in images])


def loaded(scene: SyntheticScene, folder, names, size: int) -> list:
    """Write the named pictures and load them as the Matcher does."""
    for name in names:
        Image.fromarray(scene.render(name)).save(folder / name)
    return [load_image(folder / name, size, name=name) for name in names]


def nn_errors(scene: SyntheticScene, im_a: LoadedImage, im_b: LoadedImage, n: int = 1500) -> np.ndarray:
    """Distance (network px) between the descriptor NN in b and the true correspondence of co-visible
    network pixels of a (brute force over all pixels of b)."""
    va, vb = encode(SyntheticNetwork(scene), [im_a, im_b])
    (Wa, Ha), (Wb, Hb) = im_a.network_size, im_b.network_size
    xy1, ok = scene.true_correspondences(im_a.name, im_b.name, im_a.to_original(pixel_grid(Wa, Ha).reshape(-1, 2)))
    idx = np.random.default_rng(0).choice(np.flatnonzero(ok), n, replace=False)
    sim = va["desc"].reshape(-1, DESC_DIM)[idx] @ vb["desc"].reshape(-1, DESC_DIM).T
    nn = sim.argmax(dim=1).numpy()
    return np.linalg.norm(pixel_grid(Wb, Hb).reshape(-1, 2)[nn] - im_b.to_network(xy1[idx]), axis=1)


def test_descriptor_nearest_neighbour_is_the_true_correspondence(planes: SyntheticScene, tmp_path) -> None:
    im_a, im_b = loaded(planes, tmp_path, planes.names[:2], 320)
    assert im_a.network_size == SIZE
    err = nn_errors(planes, im_a, im_b)
    assert (err <= 1.5).mean() > 0.95
    assert np.median(err) < 0.6


def test_descriptor_nn_at_half_network_resolution(tmp_path) -> None:
    scene = SyntheticScene.make(num_cameras=10, image_size=(640, 480), seed=2, kind="box")
    im_a, im_b = loaded(scene, tmp_path, scene.names[3:5], 320)
    assert im_a.network_size == (320, 240) and im_a.original_size == (640, 480)
    err = nn_errors(scene, im_a, im_b)
    assert (err <= 1.5).mean() > 0.95


def test_network_pixels_follow_the_loaded_image(tmp_path) -> None:
    """At 160 px a 640x480 picture is resized to 160x120 and cropped to 160x112 (4 rows off the top):
    network pixel (x, y) is described by the point seen at original ((x + 0.5) * 4 - 0.5, (y + 4.5) * 4 - 0.5)."""
    scene = SyntheticScene.make(num_cameras=4, image_size=(640, 480), seed=2, kind="box")
    (im,) = loaded(scene, tmp_path, scene.names[:1], 160)
    assert im.network_size == (160, 112) and im.crop_offset == (0, 4)
    desc = encode(SyntheticNetwork(scene), [im])[0]["desc"].numpy()
    xy = np.array([[150, 100], [40, 90]], np.float64)
    X, hit, _ = scene.cast(im.name, (xy + [0.5, 4.5]) * 4 - 0.5)
    assert hit.all()
    np.testing.assert_allclose(desc[[100, 90], [150, 40]], scene.descriptor_field(X), atol=1e-6)


def test_descriptor_similarity_falls_off_with_distance(planes: SyntheticScene) -> None:
    X, valid = planes.points(planes.names[5])
    pts = X[valid][::97]
    rng = np.random.default_rng(3)
    d0 = planes.descriptor_field(pts)
    np.testing.assert_allclose(np.linalg.norm(d0, axis=-1), 1.0, atol=1e-6)
    sims = []
    for px in (0.5, 1.0, 3.0, 6.0):
        step = rng.standard_normal(pts.shape)
        step *= px * planes.footprint / np.linalg.norm(step, axis=1, keepdims=True)
        sims.append((d0 * planes.descriptor_field(pts + step)).sum(-1).mean())
    # 1 - d(X).d(Y) ~ 2.18 (|X - Y| / wavelength)^2 with a wavelength of 16 footprints
    assert sims[0] > 0.995 and sims[1] > 0.98          # within ~1 px footprint: nearly identical
    assert sims[2] < 0.95 and sims[3] < 0.8            # a few px apart: distinguishable


def test_network_encodings(box: SyntheticScene, tmp_path) -> None:
    net = SyntheticNetwork(box, conf_valid=5.0, conf_invalid=0.5)
    im_a, im_b = loaded(box, tmp_path, box.names[:2], 320)
    ea, eb = encode(net, [im_a, im_b])
    assert net.encoded == [(im_a.name, None), (im_b.name, None)]
    assert ea["desc"].dtype == torch.float32 and ea["desc"].shape == (SIZE[1], SIZE[0], DESC_DIM)
    assert ea["desc_conf"].dtype == torch.float32 and ea["desc_conf"].shape == (SIZE[1], SIZE[0])
    np.testing.assert_allclose(ea["desc"].norm(dim=-1).numpy(), 1.0, atol=1e-5)
    # valid pixels: the ideal descriptors and high confidence; sky: random and low confidence
    X, valid = box.points(im_a.name)
    assert 0.2 < (~valid).mean() < 0.8
    conf = ea["desc_conf"].numpy()
    assert (conf[valid] == 5.0).all() and (conf[~valid] == 0.5).all()
    np.testing.assert_allclose(ea["desc"].numpy()[valid], box.descriptor_field(X[valid]), atol=1e-6)
    sky = ~valid & ~box.points(im_b.name)[1]
    cos = (ea["desc"].numpy()[sky] * eb["desc"].numpy()[sky]).sum(-1)
    assert np.abs(cos).mean() < 0.3                                 # independent per image
    # a crop: the pixels of the window at full resolution, its own random sky
    window = (40, 24, 200, 152)
    crop = net.describe(im_a.name, window, lambda xy: xy + np.array(window[:2], np.float64), (128, 160))
    l, t, r, b = window
    inside = valid[t:b, l:r]
    np.testing.assert_allclose(crop["desc"].numpy()[inside], ea["desc"].numpy()[t:b, l:r][inside], atol=1e-6)
    assert not np.allclose(crop["desc"].numpy()[~inside], ea["desc"].numpy()[t:b, l:r][~inside])
    # decode stacks; the symmetric order is (a, b, b, a); descriptors do not depend on the pair
    v0, v1 = net.decode([ea, eb], [eb, ea])
    assert v0["desc"].shape == (2, SIZE[1], SIZE[0], DESC_DIM) and torch.equal(v0["desc"][1], eb["desc"])
    res = net.decode([ea], [eb], symmetric=True)
    assert [torch.equal(r["desc"][0], e["desc"]) for r, e in zip(res, (ea, eb, eb, ea))] == [True] * 4
    # deterministic, optional noise keeps unit norm and perturbs a little
    assert torch.equal(encode(SyntheticNetwork(box), [im_a])[0]["desc"], ea["desc"])
    noisy = encode(SyntheticNetwork(box, noise=0.02), [im_a])[0]["desc"]
    np.testing.assert_allclose(noisy.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    cos = (noisy * ea["desc"]).sum(-1).numpy()[valid]
    assert 0.97 < cos.mean() < 0.9999
    with pytest.raises(ValueError, match="map of every image"):
        net.encode(im_a.img, [(im_a.name, None)], [None])


def test_network_settings(box: SyntheticScene, planes: SyntheticScene) -> None:
    """The settings (keys of stored matches) tell scenes and oracle parameters apart."""
    settings = SyntheticNetwork(box).settings()
    assert settings["network"] == "synthetic"
    assert SyntheticNetwork(SyntheticScene.make(num_cameras=10, image_size=SIZE, seed=1, kind="box")).settings() \
        == settings
    assert SyntheticNetwork(planes).settings()["scene"] != settings["scene"]
    assert SyntheticNetwork(box, noise=0.01).settings() != settings


# -- ground truth and scoring ----------------------------------------------------------------------

@pytest.mark.parametrize("model", ["PINHOLE", "SIMPLE_RADIAL"])
def test_reconstruction_matches_scene(model: str) -> None:
    scene = SyntheticScene.make(num_cameras=6, image_size=SIZE, seed=4, camera_model=model,
                                subfolders=2)
    rec = scene.reconstruction()
    assert rec.num_images() == 6 and rec.num_cameras() == 2 and rec.num_reg_images() == 6
    assert scene.reconstruction(per_image_cameras=True).num_cameras() == 6
    assert SyntheticScene.make(num_cameras=4, image_size=SIZE).reconstruction().num_cameras() == 1
    X, valid = scene.points(scene.names[1])
    pts = X[valid][::301]
    for image in rec.images.values():
        assert image.camera.model_name == model
        assert image.camera.width == SIZE[0] and image.camera.height == SIZE[1]
        xy, z = scene.project(image.name, pts)
        front = z > 0
        colmap = np.array([image.project_point(p) for p in pts[front]])
        # COLMAP puts the top-left pixel centre at (0.5, 0.5), hloc at (0, 0).
        np.testing.assert_allclose(colmap - 0.5, xy[front], atol=1e-8)
        pose = scene.cam_from_world(image.name)
        np.testing.assert_allclose(image.cam_from_world().matrix(), pose.matrix(), atol=1e-12)
        np.testing.assert_allclose(image.projection_center(), scene.centers[scene.index(image.name)],
                                   atol=1e-12)


def test_pose_errors(planes: SyntheticScene) -> None:
    rec = planes.reconstruction()
    res = pose_errors(rec, planes)
    assert res["unregistered"] == [] and res["registered"] == planes.names
    assert res["max_rotation_deg"] < 1e-6 and res["max_center_rel"] < 1e-9

    # Invariant to a similarity of the whole reconstruction.
    moved = planes.reconstruction()
    sim = pycolmap.Sim3d(2.5, pycolmap.Rotation3d(np.array([0.3, -0.2, 1.1])), np.array([1.0, 2.0, -3.0]))
    moved.transform(sim)
    res = pose_errors(moved, planes)
    assert res["max_rotation_deg"] < 1e-6 and res["max_center_rel"] < 1e-9
    s, R, t = res["sim3"]
    assert s == pytest.approx(1 / 2.5)
    centers = np.stack([moved.image(i + 1).projection_center() for i in range(len(planes.names))])
    ref = pycolmap.estimate_sim3d(centers, planes.centers)
    if ref is not None:
        np.testing.assert_allclose(ref.matrix(), np.c_[s * R, t], atol=1e-8)

    # One camera rotated by 1 degree about its centre.
    bad = planes.reconstruction()
    image = bad.image(4)
    pose = image.cam_from_world()
    R_new = pycolmap.Rotation3d(np.array([0.0, np.radians(1.0), 0.0])).matrix() @ pose.rotation.matrix()
    center = image.projection_center()
    bad.frame(image.frame_id).rig_from_world = pycolmap.Rigid3d(pycolmap.Rotation3d(R_new),
                                                                -R_new @ center)
    res = pose_errors(bad, planes)
    assert res["rotation_deg"][image.name] == pytest.approx(1.0, abs=1e-6)
    assert max(v for k, v in res["rotation_deg"].items() if k != image.name) < 1e-6
    assert res["max_center_rel"] < 1e-9

    # One camera displaced by 2 % of the scene size; one image dropped.
    bad = planes.reconstruction()
    image = bad.image(7)
    pose = image.cam_from_world()
    shift = np.array([0.0, 0.0, 0.02 * planes.scene_size])
    bad.frame(image.frame_id).rig_from_world = pycolmap.Rigid3d(
        pose.rotation, pose.translation - pose.rotation.matrix() @ shift)
    bad.deregister_frame(bad.image(2).frame_id)
    res = pose_errors(bad, planes)
    assert res["unregistered"] == [planes.names[1]]
    assert planes.names[1] not in res["rotation_deg"]
    assert res["center_rel"][image.name] > 0.015
    assert res["max_rotation_deg"] < 1e-6

    # Too few images to align.
    for frame_id in list(bad.reg_frame_ids())[2:]:
        bad.deregister_frame(frame_id)
    res = pose_errors(bad, planes)
    assert len(res["registered"]) == 2 and res["sim3"] is None
    assert np.isnan(res["max_rotation_deg"])


def test_umeyama_recovers_a_similarity() -> None:
    rng = np.random.default_rng(0)
    src = rng.standard_normal((20, 3))
    R = pycolmap.Rotation3d(np.array([0.4, 0.1, -0.7])).matrix()
    tgt = 0.7 * src @ R.T + np.array([1.0, -2.0, 0.5])
    s, R_est, t = umeyama(src, tgt)
    assert s == pytest.approx(0.7)
    np.testing.assert_allclose(R_est, R, atol=1e-12)
    np.testing.assert_allclose(t, [1.0, -2.0, 0.5], atol=1e-12)
