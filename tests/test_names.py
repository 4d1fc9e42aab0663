"""Any image name COLMAP accepts works end to end; the few that cannot work are refused before matching.

Verification estimates pair by pair (no pairs file), and must give exactly what ``pycolmap.verify_matches``
gives: same configuration and same inlier matches, pair by pair, on a synthetic database that is hard
enough for RANSAC's random draws to matter (another seed changes the inliers of most pairs).
"""

from __future__ import annotations

import mast3r_colmap  # noqa: F401  (first: Pillow before pycolmap, see mast3r_colmap/__init__.py)

import os
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image

from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.pipeline import PipelineConfig, check_image_names, reconstruct
from mast3r_colmap.structures import IndexMatches
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene
from mast3r_colmap.verification import verification_options, verify_matches
from test_export import Scene, build_database, make_scene

PLAIN, ODD = "seq/img", "sub dir/ünï cödé "


def _hard_scene(root: Path, prefix: str) -> Scene:
    """Noisy keypoints, 60 % outliers, and pairs with random, 10, 0 and 18 matches."""
    scene = make_scene(root, n_images=6, n_points=300, noise=2.0, outlier_ratio=0.6, prefix=prefix)
    rng = np.random.default_rng(5)
    ms = list(scene.matches)
    n0, n1 = (len(scene.keypoints[n]) for n in ms[0].pair)
    ms[0] = IndexMatches(*ms[0].pair, np.stack([rng.permutation(n0)[:60], rng.permutation(n1)[:60]], -1),
                         np.ones(60))
    for k, count in ((1, 10), (2, 0), (3, 18)):
        ms[k] = IndexMatches(*ms[k].pair, ms[k].matches[:count], ms[k].scores[:count])
    scene.matches = ms
    return scene


def _geometries(db_path: Path, pairs: list[tuple[str, str]]) -> list[tuple[int, bytes]]:
    with pycolmap.Database.open(str(db_path)) as db:
        ids = {im.name: im.image_id for im in db.read_all_images()}
        out = []
        for a, b in pairs:
            tvg = db.read_two_view_geometry(ids[a], ids[b])
            out.append((int(tvg.config), np.asarray(tvg.inlier_matches, np.uint32).tobytes()))
        return out


@pytest.mark.parametrize("intrinsics", ["500,320,240,0", None], ids=["calibrated", "uncalibrated"])
def test_verification_same_as_pycolmap_with_any_names(tmp_path: Path, intrinsics: str | None) -> None:
    pycolmap.logging.minloglevel = 2
    plain = _hard_scene(tmp_path / "plain", PLAIN)
    odd = _hard_scene(tmp_path / "odd", ODD)                 # the same scene under names with spaces
    assert odd.names[0] == "sub dir/ünï cödé 00.png"
    ref_db, db = tmp_path / "ref.db", tmp_path / "odd.db"
    build_database(plain, ref_db, intrinsics)
    build_database(odd, db, intrinsics)
    ref_pairs = [m.pair for m in plain.matches]
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("\n".join(f"{a} {b}" for a, b in ref_pairs) + "\n")
    pycolmap.verify_matches(str(ref_db), str(pairs_file), options=verification_options(None))

    pairs = [m.pair for m in odd.matches]
    result = verify_matches(db, pairs, num_threads=3)
    ref = _geometries(ref_db, ref_pairs)
    ours = _geometries(db, pairs)
    for pair, (ref_config, ref_inliers), (config, inliers) in zip(pairs, ref, ours):
        assert config == ref_config, pair
        assert inliers == ref_inliers, pair
    assert [result[p] for p in pairs] == [len(i) // 8 for _, i in ref]
    configs = [c for c, _ in ours]
    assert configs[1] == configs[2] == int(pycolmap.TwoViewGeometryConfiguration.DEGENERATE)   # 10, 0 matches
    assert int(pycolmap.TwoViewGeometryConfiguration.UNDEFINED) not in configs
    assert sum(n > 100 for n in result.values()) == 11

    # The comparison can fail: another RANSAC seed changes the inliers of many pairs.
    other = tmp_path / "seed1.db"
    build_database(odd, other, intrinsics)
    verify_matches(other, pairs, options={"ransac": {"random_seed": 1}}, num_threads=1)
    assert sum(a != b for a, b in zip(_geometries(other, pairs), ref)) >= 5

    # pairs=None verifies every pair with matches (not the empty one), smaller id first (as
    # pycolmap.geometric_verification does).
    again = tmp_path / "all.db"
    build_database(odd, again, intrinsics)
    everything = verify_matches(again, None, num_threads=2)
    assert {frozenset(p) for p in everything} == {frozenset(p) for k, p in enumerate(pairs) if k != 2}
    assert [g for k, g in enumerate(_geometries(again, pairs)) if k != 2] == ours[:2] + ours[3:]


def _renamed_scene(names: list[str]) -> SyntheticScene:
    scene = SyntheticScene.make(num_cameras=len(names), image_size=(320, 240), seed=0, kind="planes", arc_deg=70)
    scene.names = list(names)
    return scene


def test_names_with_spaces_unicode_and_subfolders_end_to_end(tmp_path: Path) -> None:
    pycolmap.logging.minloglevel = 2
    names = ["a b.jpg", "ünï cödé.jpg", "sub dir/c.jpg", "sub dir/d.jpg", "e.jpg"]
    scene = _renamed_scene(names)
    scene.write_images(tmp_path / "images")
    matcher = Matcher(SyntheticNetwork(scene), get_config("default", image_size=160), image_dir=tmp_path / "images")
    config = PipelineConfig(pairs="exhaustive", camera_model="PINHOLE", progress=False)
    result = reconstruct(tmp_path / "images", tmp_path / "database.db", matcher, config,
                         output_dir=tmp_path / "sparse")
    assert result["num_registered_images"] == len(names)
    assert result["num_verified_pairs"] == 10
    rec = pycolmap.Reconstruction(str(tmp_path / "sparse"))
    assert sorted(im.name for im in rec.images.values()) == sorted(names)
    with pycolmap.Database.open(str(tmp_path / "database.db")) as db:
        assert db.num_verified_image_pairs() == 10
    assert sorted(os.listdir(tmp_path)) == ["database.db", "database.db.mast3r-matches.sqlite", "images", "sparse"]


class _MustNotMatch:
    def settings(self):
        return {"source": "none"}

    def match_pairs(self, pairs):
        raise AssertionError("matching started")


def test_names_that_cannot_work_are_refused_before_matching(tmp_path: Path) -> None:
    check_image_names(["a b.jpg", "x\ny.jpg", "ü/c d.png", "a-b.jpg", "a/b.jpg"])   # all fine without h5
    with pytest.raises(ValueError, match=r"not valid UTF-8.*b'caf\\xe9.png'"):
        check_image_names(["ok.png", os.fsdecode(b"caf\xe9.png")])
    with pytest.raises(ValueError, match=r"2 image name\(s\) contain whitespace.*'a b.jpg', 'c\\td.jpg'"):
        check_image_names(["a b.jpg", "c\td.jpg", "ok.jpg"], export_h5=True)
    with pytest.raises(ValueError, match=r"same hloc matches.h5 key.*'a/b.jpg', 'a-b.jpg'"):
        check_image_names(["a/b.jpg", "a-b.jpg"], export_h5=True)
    check_image_names(["sub/a.jpg", "b.jpg", "ünï.jpg"], export_h5=True)

    # Through the pipeline: refused before anything is matched or written.
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a b.jpg", "c.jpg"):
        Image.new("RGB", (64, 48)).save(images / name)
    config = PipelineConfig(progress=False, mapper="none")
    with pytest.raises(ValueError, match="whitespace.*'a b.jpg'"):
        reconstruct(images, tmp_path / "db.db", _MustNotMatch(), config, export_h5=tmp_path / "h5")
    Image.new("RGB", (64, 48)).save(images / "tmp.jpg")
    os.rename(images / "tmp.jpg", os.path.join(os.fsencode(images), b"caf\xe9.jpg"))   # not UTF-8
    with pytest.raises(ValueError, match="not valid UTF-8"):
        reconstruct(images, tmp_path / "db.db", _MustNotMatch(), config)
    assert sorted(os.listdir(tmp_path)) == ["images"]
