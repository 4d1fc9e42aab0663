"""``mast3r_colmap.hloc`` inside hloc: hloc's own ``reconstruction``, ``triangulation`` and ``localize_sfm``
run unchanged on what ``mast3r_colmap.hloc.main`` writes, on a synthetic scene with known geometry.

The README's "Inside hloc" lines are read from README.md (:data:`README_RECONSTRUCTION`,
:data:`README_AACHEN`) and executed as written; only the network is swapped for the synthetic scene's oracle (``build_matcher``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import h5py
import numpy as np
import pycolmap
import pytest

from mast3r_colmap import hloc as mast3r_dense
from mast3r_colmap.export import hloc_h5
from mast3r_colmap.images import load_image
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.pairs import read_pairs, write_pairs
from mast3r_colmap.structures import SamplingGrid
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene, pose_errors

IMAGE_SIZE = (320, 240)
MATCHER_CONF = get_config("default", image_size=160)  # the synthetic pictures matched at half resolution
MAX_ROTATION_DEG = 0.5
MAX_CENTER_REL = 0.01  # of the scene size

def _readme_blocks() -> list[str]:
    """The Python blocks of the README's "Inside hloc" section, run as written by the tests below."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Inside hloc"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


#: README "Inside hloc": MASt3R in a reconstruction.main run (SfM from scratch), and hloc's Aachen v1.1
#: LoFTR pipeline with MASt3R (``match_dense`` -> ``mast3r_dense``, ``estimate_two_view_geometries=True``).
README_RECONSTRUCTION, README_AACHEN = _readme_blocks()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """12 cameras on an arc: 8 references, 4 queries (``query/...``), pictures on disk."""
    pycolmap.logging.minloglevel = 2
    base = SyntheticScene.make(num_cameras=12, image_size=IMAGE_SIZE, seed=1, kind="planes")
    names = [f"query/q{i:02d}.png" if i in (2, 5, 6, 9) else f"db/{i:02d}.png" for i in range(12)]
    scene = dataclasses.replace(base, names=names, _points={})
    root = tmp_path_factory.mktemp("hloc_api")
    scene.write_images(root / "images")
    return scene, root


@pytest.fixture
def oracle(world, monkeypatch):
    """``build_matcher`` gives the synthetic oracle (the README lines load no network); counts matched pairs."""
    scene, root = world
    matcher = Matcher(SyntheticNetwork(scene), MATCHER_CONF, image_dir=root / "images")
    matched = []
    match_pairs = matcher.match_pairs

    def counting(pairs):
        pairs = list(pairs)
        matched.extend(pairs)
        return match_pairs(pairs)

    matcher.match_pairs = counting
    monkeypatch.setattr(mast3r_dense, "build_matcher", lambda conf, image_dir: matcher)
    return matcher, matched


def _queries(scene):
    return [n for n in scene.names if n.startswith("query/")]


def _references(scene):
    return [n for n in scene.names if n.startswith("db/")]


def _write_queries(scene, path: Path) -> Path:
    W, H = scene.image_size
    lines = [f"{q} PINHOLE {W} {H} {f!r} {f!r} {W / 2} {H / 2}"
             for q in _queries(scene) for f in [float(scene.focals[scene.index(q)])]]
    path.write_text("\n".join(lines) + "\n")
    return path


def _retrieval(scene, path: Path, k: int = 3) -> Path:
    """A NetVLAD stand-in: each query's k nearest references by camera centre."""
    pairs = []
    for q in _queries(scene):
        c = scene.centers[scene.index(q)]
        ranked = sorted(_references(scene), key=lambda d: np.linalg.norm(scene.centers[scene.index(d)] - c))
        pairs += [(q, d) for d in ranked[:k]]
    write_pairs(path, pairs)
    return path


def _read_poses(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        name, *v = line.split()
        q = np.array([float(x) for x in v[:4]])
        out[name] = pycolmap.Rigid3d(pycolmap.Rotation3d(np.r_[q[1:], q[0]]), np.array([float(x) for x in v[4:]]))
    return out


def _pose_error(est: pycolmap.Rigid3d, true: pycolmap.Rigid3d, scene, sim3=None) -> tuple:
    """(rotation error in degrees, centre error / scene size) of a cam_from_world pose; ``sim3`` = (s, R, t)
    maps the estimate's world to the scene's."""
    R = np.asarray(est.rotation.matrix())
    c = -R.T @ np.asarray(est.translation)
    if sim3 is not None:
        s, Rs, t = sim3
        R, c = R @ Rs.T, s * Rs @ c + t
    Rt = np.asarray(true.rotation.matrix())
    ct = -Rt.T @ np.asarray(true.translation)
    cos = np.clip((np.trace(R.T @ Rt) - 1) / 2, -1, 1)
    return float(np.degrees(np.arccos(cos))), float(np.linalg.norm(c - ct) / scene.scene_size)


def _check_queries(results: Path, scene, sim3=None) -> dict:
    poses = _read_poses(results)
    assert sorted(poses) == sorted(Path(q).name for q in _queries(scene))
    errors = {q: _pose_error(poses[Path(q).name], scene.cam_from_world(q), scene, sim3) for q in _queries(scene)}
    assert max(e[0] for e in errors.values()) < MAX_ROTATION_DEG, errors
    assert max(e[1] for e in errors.values()) < MAX_CENTER_REL, errors
    return errors


# ---- confs and file naming ----------------------------------------------------------------------


def test_confs_in_hlocs_style():
    from mast3r_colmap.matching.matcher import confs as presets
    from mast3r_colmap.model.checkpoint import DEFAULT_CHECKPOINT

    assert {"mast3r", "mast3r_hires", "mast3r_sfm", "mast3r_aachen"} <= set(mast3r_dense.confs)
    for name, conf in mast3r_dense.confs.items():
        assert conf["output"] == f"matches-{name}"
        model = conf["model"]
        assert model["name"] == "mast3r" and model["checkpoint"] == DEFAULT_CHECKPOINT
        assert model["preset"] in presets and model["precision"] in ("fp32", "bf16", "fp16")
        assert "device" in model
        kp = mast3r_dense.keypoint_config(conf, 8192)
        assert kp.cell_size == conf["cell_size"] and kp.radius == conf["max_error"] and kp.max_kps == 8192
    assert mast3r_dense.confs["mast3r_hires"]["model"]["preset"] == "hires"
    assert mast3r_dense.confs["mast3r_sfm"]["model"]["preset"] == "sfm"


# ---- reconstruction.main ------------------------------------------------------------------------


def test_reconstruction_and_localisation(world, oracle, hloc, tmp_path):
    from hloc import localize_sfm

    scene, root = world
    matcher, matched = oracle
    images, outputs = root / "images", tmp_path / "outputs"
    outputs.mkdir()
    ns = {"sfm_pairs": outputs / "pairs-sfm.txt", "references": _references(scene), "images": images,
          "outputs": outputs, "sfm_dir": outputs / "sfm"}
    exec(README_RECONSTRUCTION, ns)
    features, matches, model = ns["features"], ns["matches"], ns["model"]
    assert features == outputs / "feats_matches-mast3r.h5"
    assert matches == outputs / "matches-mast3r_pairs-sfm.h5"
    assert len(matched) == 28 and not (set(mast3r_dense.confs) & {"loftr"})
    assert sorted(hloc_h5.list_h5_names(features)) == sorted(_references(scene))
    with h5py.File(features, "r") as f:
        assert f["db/00.png"]["keypoints"].dtype == np.float32
        assert tuple(f["db/00.png"]["image_size"][()]) == IMAGE_SIZE

    err = pose_errors(model, scene)
    assert err["registered"] == _references(scene)
    assert err["max_rotation_deg"] < MAX_ROTATION_DEG, err["rotation_deg"]
    assert err["max_center_rel"] < MAX_CENTER_REL, err["center_rel"]
    assert model.num_points3D() > 500

    # a second call with the same pairs matches nothing (the pairs are in the matches file)
    assert mast3r_dense.main(mast3r_dense.confs["mast3r"], ns["sfm_pairs"], images, outputs) == (features, matches)
    assert len(matched) == 28

    # queries localised against the map, hloc's localisation with dense matchers: the map's keypoints
    # are fixed (features_ref), the queries' unquantised (max_kps=None)
    loc_pairs = _retrieval(scene, outputs / "pairs-loc.txt")
    q_features, loc_matches = mast3r_dense.main(mast3r_dense.confs["mast3r"], loc_pairs, images, outputs,
                                                features=outputs / "feats-queries.h5",
                                                matches=outputs / "matches-loc.h5",
                                                features_ref=features, max_kps=None)
    assert sorted(hloc_h5.list_h5_names(q_features)) == sorted(_queries(scene))
    assert len(matched) == 28 + 12
    assert sorted(hloc_h5.list_h5_names(features)) == sorted(_references(scene))   # the map's file is unchanged
    queries = _write_queries(scene, outputs / "queries.txt")
    for clustering in (False, True):
        results = outputs / f"results_{clustering}.txt"
        localize_sfm.main(model, queries, loc_pairs, q_features, loc_matches, results,
                          covisibility_clustering=clustering)
        _check_queries(results, scene, sim3=err["sim3"])


def test_fixed_and_unquantised_keypoints(world, oracle, tmp_path):
    """features_ref keypoints are kept and indexed as they are; localisation queries keep raw positions. The
    matches lie on network pixels, so quantised images get one keypoint per network pixel, on its centre
    (the raw positions of the query, too)."""
    scene, root = world
    images = root / "images"
    refs = _references(scene)[:3]
    pairs = tmp_path / "p.txt"
    write_pairs(pairs, [(refs[0], refs[1]), (refs[1], refs[2])])
    conf = mast3r_dense.confs["mast3r"]
    f_ref, m_ref = mast3r_dense.main(conf, pairs, images, tmp_path)
    ref = hloc_h5.read_features(f_ref)
    cell = conf["cell_size"]

    def assert_one_per_network_pixel(name, xy, at_least=0):   # (xy float32, from the file)
        g = SamplingGrid.from_map(load_image(images / name, MATCHER_CONF.image_size).to_original)
        ij = (xy - [g.ox, g.oy]) / [g.sx, g.sy]
        np.testing.assert_allclose(ij, np.round(ij), rtol=0, atol=1e-5)
        assert len(np.unique(np.round(ij), axis=0)) == len(ij) > at_least

    for name, kp in ref.items():  # quantised
        assert_one_per_network_pixel(name, kp.keypoints, 100)

    q = _queries(scene)[0]
    write_pairs(tmp_path / "loc.txt", [(q, refs[1])])
    query_keypoints = []
    for max_kps in (None, 8192):  # unquantised, quantised
        out = tmp_path / f"loc_{max_kps}"
        out.mkdir()
        fq, mq = mast3r_dense.main(conf, tmp_path / "loc.txt", images, out, features_ref=[f_ref], max_kps=max_kps)
        assert hloc_h5.list_h5_names(fq) == [q]            # reference keypoints are not copied
        kq = hloc_h5.read_features(fq)[q].keypoints
        assert_one_per_network_pixel(q, kq)
        query_keypoints.append(kq)
        m = hloc_h5.read_matches(mq, q, refs[1]).matches
        assert len(m) > 100 and m[:, 1].max() < len(ref[refs[1]].keypoints)
        # the matched reference keypoints see the same 3D points as the query keypoints
        X, valid, _ = scene.cast(refs[1], ref[refs[1]].keypoints[m[:, 1]])
        xy, vis = scene.visible(q, X[valid])
        d = np.linalg.norm(xy[vis] - kq[m[valid][vis][:, 0]], axis=1)
        assert np.median(d) < cell / 2 and np.percentile(d, 80) < cell, (max_kps, np.percentile(d, [50, 80]))
    np.testing.assert_allclose(query_keypoints[0], query_keypoints[1], rtol=0, atol=1e-4)


def test_aachen_v1_1_flow(world, oracle, hloc, tmp_path):
    """hloc's Aachen v1.1 LoFTR recipe with MASt3R: covisibility pairs of a SIFT model, triangulation with
    its poses, query matching into the same files (db keypoints fixed), localisation."""
    scene, root = world
    matcher, matched = oracle
    images, outputs = root / "images", tmp_path / "outputs"
    outputs.mkdir()
    sift_sfm = tmp_path / "sift"
    sift_sfm.mkdir()
    scene.true_model(_references(scene), stride=24).write(str(sift_sfm))  # the SIFT model stand-in
    ns = {"sift_sfm": sift_sfm, "sfm_pairs": outputs / "pairs-db-covis3.txt", "num_covis": 3, "images": images,
          "outputs": outputs, "reference_sfm": outputs / "sfm_mast3r",
          "loc_pairs": _retrieval(scene, outputs / "pairs-query-netvlad3.txt"),
          "queries": _write_queries(scene, outputs / "day_time_queries_with_intrinsics.txt"),
          "results": outputs / "Aachen-v1.1_hloc_mast3r.txt"}
    exec(README_AACHEN, ns)
    features, loc_matches = ns["features"], ns["loc_matches"]
    assert loc_matches == ns["sfm_matches"] == outputs / "matches-mast3r_aachen_pairs-db-covis3.h5"
    assert sorted(hloc_h5.list_h5_names(features)) == sorted(scene.names)
    n_sfm = len(read_pairs(ns["sfm_pairs"], dedupe=True))
    assert len(matched) == n_sfm + 12
    model = pycolmap.Reconstruction(str(ns["reference_sfm"]))
    assert model.num_reg_images() == 8 and model.num_points3D() > 500
    err = pose_errors(model, scene)
    assert err["max_rotation_deg"] < 1e-6 and err["max_center_rel"] < 1e-6   # the poses are the reference's
    _check_queries(ns["results"], scene)


# ---- command line -------------------------------------------------------------------------------


def test_cli(world, oracle, tmp_path, capsys, caplog, monkeypatch):
    scene, root = world
    pairs = tmp_path / "pairs.txt"
    write_pairs(pairs, [(a, b) for a, b in zip(_references(scene), _references(scene)[1:])][:2])
    confs_seen = []
    oracle_matcher = mast3r_dense.build_matcher  # the fixture's stand-in
    monkeypatch.setattr(mast3r_dense, "build_matcher",
                        lambda conf, image_dir: confs_seen.append(conf) or oracle_matcher(conf, image_dir))
    code = mast3r_dense.main_cli(["--conf", "mast3r_sfm", "--pairs", pairs, "--image_dir", root / "images",
                                  "--export_dir", tmp_path / "out", "--no-progress", "--cache-size", "3",
                                  "--batch-size", "2"])
    assert code == 0
    # the matcher resource flags reach the conf the matcher is built from (get_config takes them)
    assert confs_seen[0]["model"]["preset"] == "sfm"
    assert confs_seen[0]["model"]["matcher"] == {"cache_size": 3, "batch_size": 2}
    assert get_config("sfm", **confs_seen[0]["model"]["matcher"]).cache_size == 3
    assert (tmp_path / "out" / "feats_matches-mast3r_sfm.h5").is_file()
    assert (tmp_path / "out" / "matches-mast3r_sfm_pairs.h5").is_file()
    with caplog.at_level(logging.ERROR):
        assert mast3r_dense.main_cli(["--pairs", tmp_path / "nope.txt", "--image_dir", root / "images",
                                      "--export_dir", tmp_path / "out"]) == 2
    assert "does not exist" in caplog.text
    with pytest.raises(SystemExit):
        mast3r_dense.build_parser().parse_args(["--conf", "loftr", "--pairs", "p", "--image_dir", "i",
                                                "--export_dir", "e"])
