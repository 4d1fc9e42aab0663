"""match_pair / Matcher: presets, coordinates in original-image pixels, coarse-to-fine mapping, caching, with
stand-in networks plugged in where MASt3R plugs in, and with the real network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mast3r_colmap.images import load_image
from mast3r_colmap.matching.extract import border_mask, extract_correspondences_nonsym
from mast3r_colmap.matching.matcher import Matcher, MatcherConfig, get_config, match_pair
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene

OFFSET = np.array([150.0, 100.0])  # (x, y) of image 1 inside the texture, relative to image 0
HALF_OFFSET = OFFSET / 2             # the same for half_texture_pair (400x300 views)
#: Coarse-to-fine on half_texture_pair: 400x300 pictures at 256 px are 800x600 pictures at the preset's 512 px
#: (the same downscale, crops and crop pairs) with a quarter of the pixels to match.
HALF = 256


class ImageDescriptorNetwork:
    """A dense network whose descriptors are a function of the local image content only.

    encode() keeps the pixels as the encoding; decode() computes per-pixel descriptors from the 3x3
    neighbourhood (mean removed, L2-normalised): identical content gives identical descriptors, so the
    matches between two crops of one texture are known exactly.
    """

    device = torch.device("cpu")

    def __init__(self):
        self.encoded = []

    def settings(self):
        return {"network": "image-content"}

    def encode(self, images, keys, to_original):
        b, _, h, w = images.shape
        if h % 16 or w % 16:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size 16")
        self.encoded.extend([(h, w)] * b)  # one entry per encoded image
        return list(images)

    def decode(self, enc0, enc1, symmetric=False):
        view0, view1 = self._describe(torch.stack(list(enc0))), self._describe(torch.stack(list(enc1)))
        return (view0, view1, view1, view0) if symmetric else (view0, view1)

    @staticmethod
    def _describe(img):
        b, _, h, w = img.shape
        patches = F.unfold(F.pad(img, (1, 1, 1, 1), mode="replicate"), 3)  # (B, 27, H*W)
        patches = patches - patches.mean(1, keepdim=True)
        desc = F.normalize(patches, dim=1).transpose(1, 2).reshape(b, h, w, -1)
        return {"desc": desc, "desc_conf": torch.full((b, h, w), 2.0)}


def _texture() -> np.ndarray:
    """A 1000x800 RGB texture: smooth colours plus per-pixel noise."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray((rng.random((80, 100, 3)) * 255).astype(np.uint8)).resize((1000, 800), Image.BICUBIC)
    tex = np.asarray(smooth).astype(np.float32) * 0.8 + rng.random((800, 1000, 3)) * 50
    return np.clip(tex, 0, 255).astype(np.uint8)


def _views(tex: np.ndarray, size, offset, folder):
    (w, h), (ox, oy) = size, offset.astype(int)
    Image.fromarray(tex[:h, :w]).save(folder / "a.png")
    Image.fromarray(tex[oy:oy + h, ox:ox + w]).save(folder / "b.png")
    return folder / "a.png", folder / "b.png"


@pytest.fixture(scope="module")
def texture_pair(tmp_path_factory):
    """Two 800x600 views of one texture, image 1 shifted by OFFSET: the true matches are xy0 = xy1 + OFFSET."""
    return _views(_texture(), (800, 600), OFFSET, tmp_path_factory.mktemp("tex"))


@pytest.fixture(scope="module")
def half_texture_pair(tmp_path_factory):
    """Two 400x300 views of the texture, image 1 shifted by HALF_OFFSET."""
    return _views(_texture(), (400, 300), HALF_OFFSET, tmp_path_factory.mktemp("half"))


def test_presets():
    assert get_config("default") == MatcherConfig()
    assert get_config("hires").coarse_to_fine and not MatcherConfig().coarse_to_fine
    assert get_config("sfm").mode == "symmetric"
    assert get_config("default", batch_size=2).batch_size == 2
    with pytest.raises(ValueError, match="unknown matcher preset"):
        get_config("fast")
    with pytest.raises(ValueError, match="multiple of 16"):
        MatcherConfig(image_size=500)
    with pytest.raises(ValueError, match="unknown matching mode"):
        MatcherConfig(mode="dense")


def test_default_matches_in_original_pixels(texture_pair):
    """The 512-px pass: matches mapped back to 1200x900 pixels agree with the true shift to ~1 network px."""
    pm = match_pair(ImageDescriptorNetwork(), *texture_pair, "default")
    assert pm.xy0.dtype == np.float64 and pm.scores.dtype == np.float32
    assert len(pm) > 300
    err = np.abs(pm.xy0 - (pm.xy1 + OFFSET))
    scale = 800 / 512
    assert np.median(err) < 0.5 * scale
    assert np.mean(err.max(1) < 1.5 * scale) > 0.9
    assert (pm.xy0[:, 0] >= 0).all() and (pm.xy0[:, 0] <= 799).all()
    assert (pm.xy0[:, 1] >= 0).all() and (pm.xy0[:, 1] <= 599).all()


@pytest.mark.slow
def test_hires_is_exact_at_full_resolution(half_texture_pair):
    """Coarse-to-fine: crops at native resolution give matches exactly on the true shift."""
    model = ImageDescriptorNetwork()
    coarse = match_pair(model, *half_texture_pair, get_config("default", image_size=HALF))
    model = ImageDescriptorNetwork()
    fine = match_pair(model, *half_texture_pair, get_config("hires", image_size=HALF))
    assert len(fine) > 3 * len(coarse)
    exact = np.all(fine.xy0 == fine.xy1 + HALF_OFFSET, axis=1)
    # the rest come from crop pairs that only partly overlap (content absent from the other crop)
    assert exact.mean() > 0.95, f"{exact.mean():.3f} of the fine matches are exact"
    # integer full-resolution pixels, unique rows
    assert np.array_equal(fine.xy0, np.round(fine.xy0))
    assert len(np.unique(np.concatenate([fine.xy0, fine.xy1], 1), axis=0)) == len(fine)
    # every crop is encoded once: the crop shapes are training resolutions
    crops = [s for s in model.encoded if s != (192, 256)]
    assert crops == [] or all(h % 16 == 0 and w % 16 == 0 for h, w in crops)


def test_hires_equals_default_for_small_images(tmp_path):
    """200x150 pictures at 256 px (as 400x300 ones at the preset's 512 px): upsampled, never cropped."""
    rng = np.random.default_rng(1)
    tex = Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).resize((240, 180), Image.BICUBIC)
    tex = np.asarray(tex)
    Image.fromarray(tex[:150, :200]).save(tmp_path / "a.png")
    Image.fromarray(tex[10:160, 15:215]).save(tmp_path / "b.png")
    pair = (tmp_path / "a.png", tmp_path / "b.png")
    a = match_pair(ImageDescriptorNetwork(), *pair, get_config("default", image_size=HALF))
    b = match_pair(ImageDescriptorNetwork(), *pair, get_config("hires", image_size=HALF))
    assert len(a) > 0
    assert np.array_equal(a.xy0, b.xy0) and np.array_equal(a.xy1, b.xy1) and np.array_equal(a.scores, b.scores)


@pytest.mark.slow
def test_hires_with_one_small_image(half_texture_pair, tmp_path):
    """A large image with one smaller than the network size (205x165 at 256 px): the small one's crop is the image
    cut to multiples of 16."""
    a, _ = half_texture_pair
    img = Image.open(a)
    img.crop((50, 50, 255, 215)).save(tmp_path / "small.png")  # 205x165 at offset (50, 50) of image a
    pm = match_pair(ImageDescriptorNetwork(), a, tmp_path / "small.png", get_config("hires", image_size=HALF))
    exact = np.all(pm.xy0 == pm.xy1 + 50, axis=1)
    assert len(pm) > 1000 and exact.mean() > 0.9  # crops of a reach beyond what the small image shows (0.92)
    assert pm.xy1[:, 0].max() < 205 and pm.xy1[:, 1].max() < 165  # in the small image (192x160 crops)


def test_encodings_are_reused(half_texture_pair, tmp_path):
    """Three pairs over three images: each image is encoded exactly once."""
    a, b = half_texture_pair
    c = tmp_path / "c.png"
    Image.open(a).transpose(Image.FLIP_LEFT_RIGHT).save(c)
    model = ImageDescriptorNetwork()
    matcher = Matcher(model, get_config("default", image_size=HALF))
    out = list(matcher.match_pairs([(str(a), str(b)), (str(a), str(c)), (str(b), str(c))]))
    assert [(p.name0, p.name1) for p in out] == [(str(a), str(b)), (str(a), str(c)), (str(b), str(c))]
    assert len(model.encoded) == 3
    assert matcher.encodings.misses == 3 and matcher.encodings.hits == 3


def test_match_pair_equals_the_manual_steps(small_model, vectors, tmp_path):
    """The real network: match_pair = load_image -> descriptors -> FRM both ways -> filters -> to_original."""
    from conftest import DATA

    p0 = DATA / "sacre_coeur" / "mapping" / "03903474_1471484089.jpg"
    p1 = DATA / "sacre_coeur" / "mapping" / "02928139_3448003521.jpg"  # portrait with landscape
    pm = match_pair(small_model, p0, p1, MatcherConfig(image_size=224))
    im0, im1 = load_image(p0, 224), load_image(p1, 224)
    with torch.no_grad():
        e0, e1 = small_model.encode(im0.img), small_model.encode(im1.img)
        d0, d1 = small_model.predict(e0, e1, with_pts3d=False)
    m = extract_correspondences_nonsym(d0["desc"][0], d1["desc"][0], d0["desc_conf"][0], d1["desc_conf"][0])
    keep = border_mask(m.xy1, m.xy2, im0.true_shape[0].tolist(), im1.true_shape[0].tolist(), 3) & (m.conf >= 1.001)
    assert len(pm) == keep.sum() > 0
    np.testing.assert_array_equal(pm.xy0, im0.to_original(m.xy1[keep].astype(np.float64)))
    np.testing.assert_array_equal(pm.xy1, im1.to_original(m.xy2[keep].astype(np.float64)))
    np.testing.assert_array_equal(pm.scores, m.conf[keep])


def test_sfm_preset_equals_symmetric_extraction(small_model):
    """The 'sfm' preset: symmetric inference + MASt3R-SfM correspondences (score sqrt(q1 q2))."""
    from conftest import DATA
    from mast3r_colmap.matching.extract import extract_correspondences_symmetric

    p0 = DATA / "sacre_coeur" / "mapping" / "03903474_1471484089.jpg"
    p1 = DATA / "sacre_coeur" / "mapping" / "10265353_3838484249.jpg"
    pm = match_pair(small_model, p0, p1, get_config("sfm", image_size=224))
    im0, im1 = load_image(p0, 224), load_image(p1, 224)
    with torch.no_grad():
        res = small_model.symmetric(small_model.encode(im0.img), small_model.encode(im1.img))
    m = extract_correspondences_symmetric([r["desc"][0] for r in res], [r["desc_conf"][0] for r in res])
    keep = border_mask(m.xy1, m.xy2, im0.true_shape[0].tolist(), im1.true_shape[0].tolist(), 3)
    assert len(pm) == keep.sum() > 0
    np.testing.assert_array_equal(pm.xy0, im0.to_original(m.xy1[keep].astype(np.float64)))
    np.testing.assert_array_equal(pm.scores, m.conf[keep])


@pytest.mark.slow
def test_hires_decodes_originals_only_for_missing_crops(half_texture_pair, monkeypatch):
    """A pair matched again with its crop encodings cached decodes no full-resolution image."""
    import mast3r_colmap.matching.matcher as matcher_module

    a, b = half_texture_pair
    decoded = []
    real = matcher_module.load_original
    monkeypatch.setattr(matcher_module, "load_original", lambda p: decoded.append(p) or real(p))
    model = ImageDescriptorNetwork()
    matcher = Matcher(model, get_config("hires", image_size=HALF))
    first = matcher.match_pair(str(a), str(b))
    assert sorted(decoded) == sorted([str(a), str(b)])
    n_encoded = len(model.encoded)
    second = matcher.match_pair(str(a), str(b))
    assert len(decoded) == 2 and len(model.encoded) == n_encoded  # everything came from the caches
    np.testing.assert_array_equal(first.xy0, second.xy0)
    np.testing.assert_array_equal(first.scores, second.scores)


def _live_loader_threads():
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("mast3r-load")]


def test_prefetching_loads_in_background_with_identical_results(texture_pair, tmp_path, monkeypatch):
    import threading

    import mast3r_colmap.matching.matcher as matcher_module

    a, b = texture_pair
    names = []
    for i, angle in enumerate((0, 90, 180, 270)):
        Image.open(a if i % 2 else b).rotate(angle, expand=True).save(tmp_path / f"{i}.png")
        names.append(f"{i}.png")
    pairs = [(names[i], names[j]) for i in range(4) for j in range(i + 1, 4)]
    threads = []
    real_load = matcher_module.load_image
    monkeypatch.setattr(matcher_module, "load_image",
                        lambda *a, **k: threads.append(threading.current_thread().name) or real_load(*a, **k))
    results = {}
    for workers in (0, 2):
        threads.clear()
        matcher = Matcher(ImageDescriptorNetwork(), {"num_workers": workers, "batch_size": 1, "image_size": 128},
                          image_dir=tmp_path)
        results[workers] = list(matcher.match_pairs(pairs))
        assert len(threads) == 4  # every image decoded once
        loaders = [t for t in threads if t.startswith("mast3r-load")]
        assert len(loaders) == (0 if workers == 0 else 4)  # ... in the background when asked
        assert [im.name for im in matcher.images(reversed(names))] == names[::-1]
        assert not _live_loader_threads()
    assert sum(len(p) for p in results[0]) > 100
    for p, q in zip(results[0], results[2]):
        assert (p.name0, p.name1) == (q.name0, q.name1)
        np.testing.assert_array_equal(p.xy0, q.xy0)
        np.testing.assert_array_equal(p.xy1, q.xy1)
        np.testing.assert_array_equal(p.scores, q.scores)


def test_prefetching_raises_bad_images_at_their_pair(half_texture_pair, tmp_path):
    """The pairs before an unreadable image are delivered (even from a partial batch), then it raises."""
    from mast3r_colmap.images import ImageLoadError

    a, b = half_texture_pair
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    # 320 px: ~2300 matches in the first pair (~950 at 256 px)
    matcher = Matcher(ImageDescriptorNetwork(), {"num_workers": 2, "batch_size": 2, "image_size": 320})
    results = matcher.match_pairs([(str(a), str(b)), (str(a), str(tmp_path / "broken.jpg")), (str(b), str(a))])
    assert len(next(results)) > 1000
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        next(results)
    assert not _live_loader_threads()
    # a consumer that stops early leaves no thread behind either
    early = matcher.match_pairs([(str(a), str(b)), (str(b), str(a))])
    next(early)
    early.close()
    assert not _live_loader_threads()


def test_mast3r_is_plugged_in_with_its_settings(small_model):
    """A MASt3R model is wrapped at the seam; the settings that key stored matches are unchanged."""
    from mast3r_colmap.matching.dense import MASt3RNetwork

    matcher = Matcher(small_model, "default")
    assert isinstance(matcher.network, MASt3RNetwork) and matcher.network.device == small_model.device
    settings = matcher.settings()
    assert settings["weights"] == small_model.weights_digest()
    assert settings["model"] == repr(small_model.conf) and settings["precision"] == "torch.float32"
    assert set(settings) == {"weights", "model", "precision", "image_size", "mode", "subsample", "pixel_tol",
                             "border", "conf_threshold", "coarse_to_fine", "crop_overlap"}


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory):
    """Two 320x240 pictures of a synthetic scene, whose true correspondences are known."""
    scene = SyntheticScene.make(num_cameras=4, image_size=(320, 240), seed=0, kind="planes", arc_deg=40)
    folder = tmp_path_factory.mktemp("synthetic")
    for name in scene.names[1:3]:
        Image.fromarray(scene.render(name)).save(folder / name)
    return scene, folder, scene.names[1], scene.names[2]


def _errors(scene, pm):
    """Distance of xy1 to the true correspondence of xy0, for the matches whose point is seen in both."""
    xy1, ok = scene.true_correspondences(pm.name0, pm.name1, pm.xy0)
    assert ok.mean() > 0.95
    return np.linalg.norm(pm.xy1 - xy1, axis=1)[ok]


def test_hires_on_the_synthetic_scene(synthetic_pair):
    """The oracle goes through the same coarse-to-fine as MASt3R: 160-px matches (2 original px per network
    pixel) refined with full-resolution crops, each encoded once and cached."""
    scene, folder, a, b = synthetic_pair
    coarse = Matcher(SyntheticNetwork(scene), get_config("default", image_size=160), image_dir=folder).match_pair(a, b)
    network = SyntheticNetwork(scene)
    matcher = Matcher(network, get_config("hires", image_size=160), image_dir=folder)
    fine = matcher.match_pair(a, b)
    e_coarse, e_fine = _errors(scene, coarse), _errors(scene, fine)
    assert len(fine) > 2 * len(coarse) > 500
    assert np.median(e_coarse) > 0.6 and np.median(e_fine) < 0.45  # a full-resolution pixel: 0.38 on average
    assert np.mean(e_fine > 3) < 0.01                                 # crop pairs that only partly overlap
    assert np.array_equal(fine.xy0, np.round(fine.xy0)) and np.array_equal(fine.xy1, np.round(fine.xy1))
    crops = [key for key in network.encoded if key[1] is not None]
    assert len(crops) > 4 and len(set(network.encoded)) == len(network.encoded) == len(crops) + 2
    again = matcher.match_pair(a, b)
    assert len(network.encoded) == len(crops) + 2                    # everything came from the cache
    np.testing.assert_array_equal(again.xy0, fine.xy0)
    np.testing.assert_array_equal(again.scores, fine.scores)


def test_sfm_preset_on_the_synthetic_scene(synthetic_pair):
    """Symmetric decoding (both orders) on the oracle: correct matches with MASt3R-SfM's score sqrt(5 * 5)."""
    scene, folder, a, b = synthetic_pair
    pm = Matcher(SyntheticNetwork(scene), get_config("sfm", image_size=320), image_dir=folder).match_pair(a, b)
    assert len(pm) > 500 and np.median(_errors(scene, pm)) < 0.45
    assert np.mean(pm.scores == 5.0) > 0.95
