"""CI guard of the ordering that ``benchmarks/bench_sfm_accuracy.py`` shows: on the same raw matches, the package's
keypoint consolidation gives a model no less accurate than hloc's dense aggregation (``hloc.match_dense`` with its
``loftr`` conf: 1-px cells, hloc's cap of 8192), so a regression of the consolidation fails here.

A small synthetic scene (8 images, 640x480, the ``default`` preset at 256 px: network pixels 2.5 px apart) is
matched once by the production Matcher; both routes of :mod:`mast3r_colmap.testing.accuracy` map the same
matches with the same options and seed. On these scenes the lossless consolidation keeps the network pixels,
while hloc snaps each to its 1-px cell: the same points and tracks, the keypoints of ours more self-consistent
(mean reprojection error 0.59 against 0.64 px over 4 seeds, 0.68 against 0.72 px with descriptor noise 0.05;
never worse), and pose and point errors 0.77-0.89x hloc's on this scene (other seeds scatter both ways by up
to 40 %: too few images to order equally accurate keypoints by pose). A consolidation that averages the
observations in 4-px cells (the one before the sampling grid) fails here: 1.37x hloc's reprojection error,
1.3x its centre error, 2.2x its point error and about 4x its median rotation error.
"""

from __future__ import annotations

import pycolmap
import pytest

from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.pairs import pairs_from_spec
from mast3r_colmap.testing import accuracy
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene

#: Two mappings of equally accurate keypoints differ in pose and point errors: by ~1 % from multi-threaded
#: bundle adjustment; ours is held within 10 % of hloc's (it is 11-23 % better on this scene).
TOLERANCE = 1.10


@pytest.fixture(scope="module")
def mapped(hloc, tmp_path_factory):
    """The scene and the scored models of both routes: {route: RouteResult}."""
    pycolmap.logging.minloglevel = 2
    root = tmp_path_factory.mktemp("sfm_accuracy")
    scene = SyntheticScene.make(num_cameras=8, image_size=(640, 480), seed=0, kind="planes")
    scene.write_images(root / "images")
    matcher = Matcher(SyntheticNetwork(scene), get_config("default", image_size=256), image_dir=root / "images")
    pairs = pairs_from_spec("sequential:3", scene.names)
    raw = accuracy.collect_matches(matcher, pairs, root / "matches.sqlite", root / "images")
    match_dense = accuracy.load_match_dense()
    routes = {"ours": accuracy.ours(raw),
              "hloc loftr": accuracy.hloc_aggregation(raw, match_dense, match_dense.confs["loftr"], root / "hloc")}
    return {name: accuracy.map_and_score(name, out, scene, root / "images", root / name.replace(" ", "_"), pairs,
                                         {"extract_colors": False}, seed=0)
            for name, out in routes.items()}


def test_ours_registers_every_image(mapped):
    ours = mapped["ours"]
    assert ours.registered == ours.num_images == 8
    assert ours.points > 4000


@pytest.mark.parametrize("field", ["median_rotation_deg", "median_center", "median_point"])
def test_ours_no_less_accurate_than_hloc_loftr(mapped, field):
    ours, hloc = getattr(mapped["ours"], field), getattr(mapped["hloc loftr"], field)
    assert ours <= TOLERANCE * hloc, f"{field}: ours {ours:.4g} > {TOLERANCE} x hloc loftr {hloc:.4g}"


def test_ours_keypoints_no_less_consistent_than_hloc_loftr(mapped):
    """The reprojection error: the steadiest sign of keypoint accuracy (no tolerance needed, see the docstring)."""
    ours, hloc = mapped["ours"].reprojection_px, mapped["hloc loftr"].reprojection_px
    assert ours <= hloc, f"mean reprojection error: ours {ours:.3f} px > hloc loftr {hloc:.3f} px"
