"""Localisation (mast3r_colmap.localization), evaluation (mast3r_colmap.evaluate) and the Aachen pipeline
(mast3r_colmap.pipelines.aachen) on synthetic scenes with known poses, plus the real sacre_coeur night query
with the small test weights."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pycolmap
import pytest
from scipy.spatial.transform import Rotation

from conftest import DATA
from mast3r_colmap import evaluate as ev
from mast3r_colmap import localization as loc
from mast3r_colmap.localization import cli as loc_cli
from mast3r_colmap.export import colmap_db, hloc_h5
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.pairs import read_pairs, sequential, write_pairs
from mast3r_colmap.pipelines import aachen
from mast3r_colmap.structures import ImageKeypoints, PairMatches
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene

IMAGE_SIZE = (320, 240)
MATCHER_CONF = get_config("default", image_size=160)  # the synthetic pictures matched at half resolution
MAX_ROTATION_DEG = 0.5
MAX_CENTER_REL = 0.01  # of the scene size


@pytest.fixture(autouse=True, scope="module")
def _quiet_colmap():
    pycolmap.logging.minloglevel = 2


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _errors(pose: pycolmap.Rigid3d, truth: pycolmap.Rigid3d, scene: SyntheticScene) -> tuple[float, float]:
    """(rotation error in degrees, camera centre error in units of the scene size)."""
    R_e, R_g = np.asarray(pose.rotation.matrix()), np.asarray(truth.rotation.matrix())
    c_e, c_g = -R_e.T @ np.asarray(pose.translation), -R_g.T @ np.asarray(truth.translation)
    return (float(np.degrees(Rotation.from_matrix(R_e @ R_g.T).magnitude())),
            float(np.linalg.norm(c_e - c_g) / scene.scene_size))


def _known_poses(scene: SyntheticScene, names) -> pycolmap.Reconstruction:
    """The true cameras and poses of ``names`` (image id = scene index + 1), no points."""
    rec = pycolmap.Reconstruction()
    for name in names:
        cam = scene.camera(name)
        if not rec.exists_camera(cam.camera_id):
            rec.add_camera_with_trivial_rig(cam)
        image = pycolmap.Image(name=name, camera_id=cam.camera_id, image_id=scene.index(name) + 1)
        rec.add_image_with_trivial_frame(image, scene.cam_from_world(name))
    return rec


class ExactMatcher:
    """Matches a query with a reference image of a true model exactly: every observed reference keypoint
    (hloc convention) with the true projection of its 3D point in the query."""

    def __init__(self, scene: SyntheticScene, model: pycolmap.Reconstruction):
        self.scene, self.model = scene, model
        self.by_name = {img.name: img for img in model.images.values()}

    def settings(self):
        return {"matcher": "exact"}

    def match_pairs(self, pairs):
        for q, r in pairs:
            img = self.by_name[r]
            idx = img.get_observation_point2D_idxs()
            pts = img.points2D
            kp = np.array([pts[i].xy for i in idx]) - 0.5
            X = np.array([self.model.points3D[pts[i].point3D_id].xyz for i in idx])
            xy, vis = self.scene.visible(q, X)
            yield PairMatches(q, r, xy[vis], kp[vis], np.full(int(vis.sum()), 5.0))


class Scripted:
    """A matcher that delegates to another one, except for scripted queries."""

    def __init__(self, base, empty=(), few=(), crash=()):
        self.base, self.empty, self.few, self.crash = base, set(empty), set(few), set(crash)

    def settings(self):
        return self.base.settings()

    def match_pairs(self, pairs):
        for q, r in pairs:
            if q in self.crash:
                raise RuntimeError("matcher exploded")
            if q in self.empty:
                yield PairMatches(q, r, np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0))
            elif q in self.few:
                pm = next(self.base.match_pairs([(q, r)]))
                yield PairMatches(q, r, pm.xy0[:1], pm.xy1[:1], pm.scores[:1])
            else:
                yield from self.base.match_pairs([(q, r)])


# ----------------------------------------------------------------------------------------------
# a map triangulated from the synthetic oracle's matches (shared by several tests)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    scene = SyntheticScene.make(num_cameras=23, image_size=IMAGE_SIZE, seed=0, kind="planes")
    root = tmp_path_factory.mktemp("localize")
    scene.write_images(root / "images")
    db_names, query_names = scene.names[0::2], scene.names[1::2]
    matcher = Matcher(SyntheticNetwork(scene), MATCHER_CONF, image_dir=root / "images")
    model = loc.triangulate_reference(_known_poses(scene, db_names), root / "images", root / "db.db", matcher,
                                      sequential(db_names, 1), root / "sfm", progress=False)
    retrieval = {q: [scene.names[j] for j in (scene.index(q) - 1, scene.index(q) + 1) if 0 <= j < len(scene.names)]
                 for q in query_names}
    return SimpleNamespace(scene=scene, root=root, images=root / "images", db=root / "db.db", sfm=root / "sfm",
                           model=model, matcher=matcher, db_names=db_names, query_names=query_names,
                           retrieval=retrieval, ref_keypoints=colmap_db.existing_keypoints(root / "db.db"))


def test_synthetic_queries(mapped, tmp_path):
    """11 queries between the map cameras: 10 with intrinsics, 1 with the focal length estimated."""
    scene = mapped.scene
    assert mapped.model.num_reg_images() == len(mapped.db_names) and mapped.model.num_points3D() > 500
    no_intrinsics = "cam_011.png"
    queries = {q: (None if q == no_intrinsics else scene.camera(q)) for q in mapped.query_names}
    results = loc.localize(queries, mapped.retrieval, mapped.model, mapped.ref_keypoints, mapped.matcher,
                           image_dir=mapped.images)
    assert list(results) == list(queries)
    errors = {}
    for q, r in results.items():
        assert r.success and r.reason is None, (q, r.reason)
        errors[q] = _errors(r.cam_from_world, scene.cam_from_world(q), scene)
        assert r.num_inliers > 0.8 * r.num_correspondences > 100
        assert r.num_matches >= r.num_correspondences
    given = {q: e for q, e in errors.items() if q != no_intrinsics}
    assert len(given) >= 10
    assert max(e[0] for e in given.values()) < MAX_ROTATION_DEG, given
    assert max(e[1] for e in given.values()) < MAX_CENTER_REL, given
    r = results[no_intrinsics]
    assert r.focal_estimated and r.camera.model.name == "SIMPLE_RADIAL"
    f_true = float(scene.focals[scene.index(no_intrinsics)])
    assert abs(r.camera.params[0] - f_true) < 0.02 * f_true
    assert errors[no_intrinsics][0] < 1.0 and errors[no_intrinsics][1] < 0.02
    print("max rotation error %.4f deg, max centre error %.2e of the scene; estimated focal %.1f (true %.1f), "
          "its errors %.4f deg %.2e" % (max(e[0] for e in given.values()), max(e[1] for e in given.values()),
                                        r.camera.params[0], f_true, *errors[no_intrinsics]))

    out = loc.write_results(tmp_path / "results.txt", results)
    lines = out.read_text().splitlines()
    assert [line.split()[0] for line in lines] == list(queries)
    log_file = loc.write_logs(loc.logs_path(out), results)
    assert log_file.name == "results_logs.jsonl"
    logs = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [e["name"] for e in logs] == list(queries)
    assert all(e["success"] and e["num_inliers"] > 0 and e["time"]["total"] > 0 for e in logs)
    # the file is what evaluate reads: everything within (0.25 m, 2 deg) in scene units
    truth = {q: scene.cam_from_world(q) for q in queries}
    stats = ev.evaluate(out, truth)
    assert stats["recall"][0]["recall"] == 1.0 and stats["num_missing"] == 0


class _CachingMatcher:
    """The synthetic matcher with a cache size: records the order in which pairs are matched."""

    def __init__(self, base, cache_size):
        self.base, self.cache_size, self.matched = base, cache_size, []

    def match_pairs(self, pairs):
        for pair in pairs:
            self.matched.append(tuple(pair))
            yield from self.base.match_pairs([pair])


def test_queries_sharing_references_are_matched_together(mapped):
    """Queries listed out of order are processed in the schedule_groups order; results keep the given order."""
    from mast3r_colmap.matching.schedule import count_encodings, schedule_groups

    names = mapped.query_names
    given = names[0::3] + names[1::3] + names[2::3]  # neighbours (which share references) far apart
    queries = {q: mapped.scene.camera(q) for q in given}
    matcher = _CachingMatcher(mapped.matcher, cache_size=4)
    results = loc.localize(queries, mapped.retrieval, mapped.model, mapped.ref_keypoints, matcher)
    assert list(results) == given and all(r.success for r in results.values())
    groups = {q: [(q, db) for db in mapped.retrieval[q]] for q in given}
    expected = [p for q in schedule_groups(groups, 4) for p in groups[q]]
    assert matcher.matched == expected
    flat_given = [p for q in given for p in groups[q]]
    assert (count_encodings(flat_given, 4), count_encodings(expected, 4)) == (33, 23)


def test_reference_keypoints_match_the_database(mapped):
    """The model's points2D are the database keypoints + 0.5 (COLMAP convention)."""
    from_model = loc.reference_keypoints(mapped.model)
    for name in mapped.db_names:
        np.testing.assert_allclose(from_model[name], mapped.ref_keypoints[name], atol=1e-3)


def test_exact_matches_pin_the_pixel_conventions(mapped):
    """Exact correspondences give an exact pose only if both the +0.5 of the query's 2D points and the
    -0.5 of the reference keypoints are right (half a pixel off would be ~0.05 deg here)."""
    scene = mapped.scene
    truth_model = scene.true_model(mapped.db_names)
    matcher = ExactMatcher(scene, truth_model)
    queries = {q: scene.camera(q) for q in mapped.query_names[:4]}
    retrieval = {q: mapped.retrieval[q] for q in queries}
    kps = loc.reference_keypoints(truth_model)
    for ref_keypoints in (kps, None):            # explicit (hloc convention) or taken from the model
        results = loc.localize(queries, retrieval, truth_model, ref_keypoints, matcher, image_dir=mapped.images)
        for q, r in results.items():
            assert r.success, r.reason
            rot, ctr = _errors(r.cam_from_world, scene.cam_from_world(q), scene)
            assert rot < 2e-3 and ctr < 2e-5, (q, rot, ctr)
            assert r.num_inliers == r.num_correspondences
    # keypoints in COLMAP's convention, or of another model, are refused before any matching
    colmap_convention = {n: k + 0.5 for n, k in kps.items()}
    with pytest.raises(ValueError, match="COLMAP's convention"):
        loc.localize(queries, retrieval, truth_model, colmap_convention, matcher)
    with pytest.raises(ValueError, match="do not belong"):
        loc.localize(queries, retrieval, truth_model, {n: k[:-1] for n, k in kps.items()}, matcher)


class Garbled:
    """Exact matches, except that the query side of the listed reference images is shuffled."""

    def __init__(self, base, garbled):
        self.base, self.garbled = base, set(garbled)

    def settings(self):
        return {"matcher": "garbled"}

    def match_pairs(self, pairs):
        rng = np.random.default_rng(0)
        for pm in self.base.match_pairs(pairs):
            if pm.name1 in self.garbled:
                pm = PairMatches(pm.name0, pm.name1, pm.xy0[rng.permutation(len(pm))], pm.xy1, pm.scores)
            yield pm


def test_covisibility_clustering(mapped):
    """Two disconnected groups of reference images: PnP per cluster, the one with most inliers wins."""
    scene = mapped.scene
    near, far = ["cam_006.png", "cam_008.png", "cam_010.png"], ["cam_016.png", "cam_018.png", "cam_020.png"]
    model = scene.true_model(near + far, groups=[near, far])
    assert loc.covisibility_clusters(model, far[:1] + near + far[1:]) == [far, near]
    q = "cam_007.png"
    retrieval = {q: ["cam_018.png", "cam_006.png", "cam_008.png", "cam_016.png"]}
    conf = loc.LocalizationConfig(covisibility_clustering=True)
    matcher = Garbled(ExactMatcher(scene, model), far)
    r = loc.localize({q: scene.camera(q)}, retrieval, model, None, matcher, conf=conf)[q]
    assert r.success
    assert r.clusters == [["cam_018.png", "cam_016.png"], ["cam_006.png", "cam_008.png"]]
    assert r.best_cluster == 1
    assert r.num_inliers == r.num_correspondences            # the near cluster only: all inliers
    rot, ctr = _errors(r.cam_from_world, scene.cam_from_world(q), scene)
    assert rot < 2e-3 and ctr < 2e-5


def test_pairs_from_covisibility_and_clusters():
    """Hand-made model: 1-2 share 3 points, 2-3 share 2, 1-3 share 1, 4-5 share 1."""
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(pycolmap.Camera(model="SIMPLE_PINHOLE", width=100, height=100,
                                                    params=[100, 50, 50], camera_id=1))
    obs = {1: [0, 1, 2, 3], 2: [0, 1, 2, 4, 5], 3: [3, 4, 5], 4: [6], 5: [6]}  # point ids seen by each image
    for i, pts in obs.items():
        image = pycolmap.Image(name=f"im{i}.png", keypoints=np.full((len(pts), 2), 10.0), camera_id=1, image_id=i)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d())
    for p in range(7):
        track = pycolmap.Track()
        for i, pts in obs.items():
            if p in pts:
                track.add_element(i, pts.index(p))
        rec.add_point3D(np.array([0.0, 0.0, 1.0 + p]), track)
    # 1-3 share point 3; 2-3 share 4, 5
    assert loc.pairs_from_covisibility(rec, 1) == [("im1.png", "im2.png"), ("im3.png", "im2.png"),
                                                   ("im4.png", "im5.png")]
    assert loc.pairs_from_covisibility(rec, 5) == [("im1.png", "im2.png"), ("im1.png", "im3.png"),
                                                   ("im2.png", "im3.png"), ("im4.png", "im5.png")]
    assert loc.covisibility_clusters(rec, ["im4.png", "im1.png", "im3.png", "im5.png", "im2.png"]) == [
        ["im1.png", "im3.png", "im2.png"], ["im4.png", "im5.png"]]
    assert loc.covisibility_clusters(rec, ["im4.png", "im1.png"]) == [["im4.png"], ["im1.png"]]
    with pytest.raises(ValueError):
        loc.pairs_from_covisibility(rec, 0)


def test_failures_give_a_fallback_line(mapped, tmp_path, caplog):
    scene, images = mapped.scene, mapped.images
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    shutil.copy(images / "cam_001.png", images / "ghost.png")      # the oracle does not know this name
    shutil.copy(images / "cam_001.png", images / "unmapped.png")
    good, empty, few, crash = "cam_003.png", "cam_005.png", "cam_007.png", "cam_009.png"
    queries = {"broken.png": scene.camera("cam_001.png"), good: scene.camera(good), empty: scene.camera(empty),
               few: scene.camera(few), crash: None, "ghost.png": scene.camera("cam_001.png"),
               "unmapped.png": None, "lonely.png": scene.camera("cam_001.png")}
    retrieval = {"broken.png": ["cam_002.png"], good: mapped.retrieval[good], empty: mapped.retrieval[empty],
                 few: mapped.retrieval[few], crash: mapped.retrieval[crash], "ghost.png": ["cam_000.png"],
                 "unmapped.png": ["nowhere.png"]}
    matcher = Scripted(mapped.matcher, empty=[empty], few=[few], crash=[crash])
    with caplog.at_level(logging.WARNING, logger="mast3r_colmap.localization"):
        results = loc.localize(queries, retrieval, mapped.model, mapped.ref_keypoints, matcher, image_dir=images)
    assert list(results) == list(queries)
    assert results[good].success
    reasons = {q: r.reason for q, r in results.items() if not r.success}
    assert set(reasons) == set(queries) - {good}
    assert "unreadable query image" in reasons["broken.png"]
    assert "no matches" in reasons[empty]
    assert "too few 2D-3D correspondences" in reasons[few]
    assert "matcher exploded" in reasons[crash]
    assert "KeyError" in reasons["ghost.png"]
    assert "none of the retrieved images is registered" in reasons["unmapped.png"]
    assert "no retrieved" in reasons["lonely.png"]
    for q in reasons:
        assert q in caplog.text
        first = retrieval.get(q, [None])[0]
        expected = mapped.model.find_image_with_name(first) if first in mapped.ref_keypoints else None
        pose = results[q].cam_from_world
        if expected is not None:            # hloc's fallback: the pose of the first retrieved image
            assert results[q].fallback == first
            np.testing.assert_allclose(pose.matrix(), expected.cam_from_world().matrix(), atol=1e-12)
        else:                               # nothing to fall back on: the identity
            np.testing.assert_allclose(pose.matrix(), np.eye(4)[:3], atol=0)
    out = loc.write_results(tmp_path / "r.txt", results)
    lines = out.read_text().splitlines()
    assert len(lines) == len(queries)
    for line in lines:
        q = np.array([float(v) for v in line.split()[1:5]])
        assert len(line.split()) == 8 and abs(np.linalg.norm(q) - 1) < 1e-9
    logs = [json.loads(line) for line in loc.write_logs(loc.logs_path(out), results).read_text().splitlines()]
    assert {e["name"]: e["reason"] for e in logs if not e["success"]} == reasons


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def _cli_inputs(mapped, tmp_path, queries):
    qfile = tmp_path / "queries.txt"
    lines = []
    for q in queries:
        cam = mapped.scene.camera(q)
        if q == queries[-1]:
            lines.append(q)                 # no intrinsics: focal estimated
        else:
            lines.append(f"{q} {cam.model.name} {cam.width} {cam.height} " + " ".join(repr(float(v)) for v in cam.params))
    qfile.write_text("\n".join(lines) + "\n")
    pfile = tmp_path / "pairs.txt"
    write_pairs(pfile, [(q, r) for q in queries for r in mapped.retrieval[q]])
    return qfile, pfile


@pytest.mark.parametrize("source", ["database", "features"])
def test_cli(mapped, tmp_path, monkeypatch, capsys, source):
    queries = ["cam_013.png", "cam_015.png"]
    qfile, pfile = _cli_inputs(mapped, tmp_path, queries)
    monkeypatch.setattr(loc_cli, "build_matcher", lambda args: mapped.matcher)
    if source == "database":
        src = ["--database", mapped.db]
    else:
        h5 = tmp_path / "features.h5"
        hloc_h5.write_features(h5, {n: ImageKeypoints(n, k) for n, k in mapped.ref_keypoints.items()})
        src = ["--features", h5]
    out = tmp_path / "out" / "results.txt"
    code = loc_cli.main(["--images", mapped.images, "--reference", mapped.sfm, *src, "--queries", qfile,
                         "--pairs", pfile, "--output", out, "--full-names", "--no-progress"])
    assert code == 0
    assert "localised 2 / 2 queries" in capsys.readouterr().out
    poses = ev.read_poses(out)
    assert list(poses) == queries
    for q in queries:
        rot, ctr = _errors(pycolmap.Rigid3d(pycolmap.Rotation3d(poses[q][0]), poses[q][1]),
                           mapped.scene.cam_from_world(q), mapped.scene)
        assert rot < MAX_ROTATION_DEG and ctr < MAX_CENTER_REL
    logs = [json.loads(line) for line in (tmp_path / "out" / "results_logs.jsonl").read_text().splitlines()]
    assert [e["focal_estimated"] for e in logs] == [False, True]


def test_cli_bad_input(mapped, tmp_path, monkeypatch, caplog):
    def never(args):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(loc_cli, "build_matcher", never)
    qfile, pfile = _cli_inputs(mapped, tmp_path, ["cam_013.png"])
    base = {"--images": mapped.images, "--reference": mapped.sfm, "--database": mapped.db, "--queries": qfile,
            "--pairs": pfile, "--output": tmp_path / "r.txt"}
    bad_queries = tmp_path / "bad_queries.txt"
    bad_queries.write_text("cam_013.png PINHOLE 320 240 1 2 3\n")
    cases = [({"--reference": tmp_path / "nope"}, "is not a folder"),
             ({"--reference": tmp_path}, "has no cameras"),
             ({"--database": tmp_path / "missing.db"}, "does not exist"),
             ({"--pairs": tmp_path / "missing.txt"}, "does not exist"),
             ({"--queries": bad_queries}, "takes 4 parameters"),
             ({"--images": tmp_path / "noimages"}, "does not exist"),
             ({"--output": tmp_path}, "is a folder")]
    for change, message in cases:
        argv = [str(a) for k, v in {**base, **change}.items() for a in (k, v)]
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            code = loc_cli.main(argv + ["--no-progress"])
        assert code == loc_cli.EXIT_BAD_INPUT, change
        assert message in caplog.text and "Traceback" not in caplog.text, (change, caplog.text)
    with pytest.raises(SystemExit) as exc:                        # argparse: both sources at once
        loc_cli.main([str(a) for k, v in base.items() for a in (k, v)] + ["--features", "x.h5"])
    assert exc.value.code == 2


def test_hires_preset_maps_to_coarse_to_fine(monkeypatch, small_model):
    args = ["--images", "i", "--reference", "r", "--database", "d", "--pairs", "p", "--output", "o"]
    parser = loc_cli.build_parser()
    assert loc_cli.matcher_config(parser.parse_args(args)).coarse_to_fine is False
    hires = parser.parse_args(args + ["--preset", "hires", "--batch-size", "3"])
    conf = loc_cli.matcher_config(hires)
    assert conf.coarse_to_fine is True and conf.batch_size == 3
    assert (conf.cache_size, conf.num_workers) == (128, 2)  # the defaults
    tuned = loc_cli.matcher_config(parser.parse_args(args + ["--cache-size", "500", "--num-workers", "0"]))
    assert (tuned.batch_size, tuned.cache_size, tuned.num_workers) == (8, 500, 0)
    with pytest.raises(ValueError, match="num_workers"):
        loc_cli.matcher_config(parser.parse_args(args + ["--num-workers", "-1"]))
    with pytest.raises(SystemExit):
        parser.parse_args(args + ["--preset", "sfm"])
    import mast3r_colmap.model.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_model", lambda source, device=None, amp_dtype=None: small_model)
    matcher = loc_cli.build_matcher(hires)
    assert matcher.conf.coarse_to_fine is True and str(matcher.image_dir) == "i"


def test_read_queries_and_retrieval(tmp_path):
    q = tmp_path / "q.txt"
    q.write_text("# comment\nquery/night/a.jpg SIMPLE_RADIAL 1600 1200 1469.2 800 600 -0.0353\n\nquery/day/b.jpg\n")
    queries = loc.read_queries(q)
    assert list(queries) == ["query/night/a.jpg", "query/day/b.jpg"]
    cam = queries["query/night/a.jpg"]
    assert cam.model.name == "SIMPLE_RADIAL" and (cam.width, cam.height) == (1600, 1200)
    np.testing.assert_allclose(cam.params, [1469.2, 800, 600, -0.0353])
    assert queries["query/day/b.jpg"] is None
    for text, message in (("a.jpg NOPE 1 1 1\n", "unknown camera model"), ("a.jpg PINHOLE 10 10 1\n", "takes 4"),
                          ("a.jpg PINHOLE x 10 1 1 1 1\n", "expected"), ("a.jpg\na.jpg\n", "twice")):
        q.write_text(text)
        with pytest.raises(ValueError, match=message):
            loc.read_queries(q)
    p = tmp_path / "pairs.txt"
    p.write_text("q1 d1\nq1 d2\nq2 d3\nq1 d1\nq1 d4")
    assert loc.read_retrieval(p) == {"q1": ["d1", "d2", "d4"], "q2": ["d3"]}
    assert loc.read_retrieval(p, num_loc=2) == {"q1": ["d1", "d2"], "q2": ["d3"]}


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------


def _pose(angle_deg: float, axis, center) -> pycolmap.Rigid3d:
    R = Rotation.from_rotvec(np.radians(angle_deg) * np.asarray(axis, float) / np.linalg.norm(axis)).as_matrix()
    return pycolmap.Rigid3d(pycolmap.Rotation3d(R), -R @ np.asarray(center, float))


def test_evaluate_hand_made(tmp_path, capsys):
    base = Rotation.from_euler("xyz", [10, -20, 30], degrees=True)
    gt, est = {}, {}
    # (name, translation error m, rotation error deg): recall (0.25,2)=1/5, (0.5,5)=2/5, (5,10)=3/5
    cases = [("exact.jpg", 0.0, 0.0), ("close.jpg", 0.3, 1.0), ("far.jpg", 1.0, 3.0), ("turned.jpg", 0.1, 20.0)]
    for k, (name, dt, dr) in enumerate(cases):
        c = np.array([k, 2.0 * k, -1.0])
        R_g = base.as_matrix()
        gt[f"query/night/{name}"] = pycolmap.Rigid3d(pycolmap.Rotation3d(R_g), -R_g @ c)
        R_e = Rotation.from_rotvec(np.radians(dr) * np.array([0.0, 0.6, 0.8])).as_matrix() @ R_g
        c_e = c + dt * np.array([0.0, 0.8, -0.6])
        est[name] = pycolmap.Rigid3d(pycolmap.Rotation3d(R_e), -R_e @ c_e)
    gt["query/night/missing.jpg"] = _pose(5, [1, 0, 0], [0, 0, 0])
    stats = ev.evaluate(est, gt)                  # results use basenames, ground truth full names
    assert stats["num_queries"] == 5 and stats["num_missing"] == 1
    assert [r["recall"] for r in stats["recall"]] == [0.2, 0.4, 0.6]
    assert stats["median_translation_error"] == pytest.approx(0.3)
    assert stats["median_rotation_error_deg"] == pytest.approx(3.0)
    assert ev.format_recall(stats) == "(0.25m, 2°) / (0.5m, 5°) / (5m, 10°): 20.0 / 40.0 / 60.0 %"
    assert [r["recall"] for r in ev.evaluate(est, gt, [(0.35, 1.5)])["recall"]] == [0.4]

    # the same through files and the command line (w-first quaternions, sign of q irrelevant)
    res_file, gt_file = tmp_path / "res.txt", tmp_path / "gt.txt"
    with open(res_file, "w") as f:
        for name, p in est.items():
            q = -np.asarray(p.rotation.quat)[[3, 0, 1, 2]]
            f.write(" ".join([name, *(repr(float(v)) for v in (*q, *np.asarray(p.translation)))]) + "\n")
    with open(gt_file, "w") as f:
        for name, p in gt.items():
            q = np.asarray(p.rotation.quat)[[3, 0, 1, 2]]
            f.write(" ".join([name, *(repr(float(v)) for v in (*q, *np.asarray(p.translation)))]) + "\n")
    assert ev.evaluate(res_file, gt_file)["recall"] == stats["recall"]
    assert ev.main([res_file, gt_file]) == 0
    out = capsys.readouterr().out
    assert "20.0 / 40.0 / 60.0" in out and "5 queries (1 missing)" in out
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 1 0 0 0 1 2\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        ev.read_poses(bad)
    assert ev.main([bad, gt_file]) == ev.EXIT_BAD_INPUT


# ----------------------------------------------------------------------------------------------
# the Aachen pipeline on a synthetic stand-in with the same layout
# ----------------------------------------------------------------------------------------------


class _MustNotMatch:
    def __init__(self, base):
        self.base = base

    def settings(self):
        return self.base.settings()

    def match_pairs(self, pairs):
        pairs = list(pairs)
        assert not pairs, f"the re-run matched {len(pairs)} pairs again"
        return iter(())


def test_aachen_pipeline_synthetic(tmp_path):
    base = SyntheticScene.make(num_cameras=12, image_size=IMAGE_SIZE, seed=1, kind="planes")
    names = []
    for i in range(12):
        if i % 2 == 0:
            names.append(f"db/{1000 + i}.png")
        elif i < 8:
            names.append(f"query/night/nexus5x/IMG_{i:04d}.png")
        else:
            names.append(f"query/day/milestone/{i:04d}.png")
    scene = dataclasses.replace(base, names=names, _points={})
    dataset = tmp_path / "aachen_v1.1"
    images = dataset / "images" / "images_upright"
    scene.write_images(images)
    db_names = [n for n in names if n.startswith("db/")]
    night = [n for n in names if "/night/" in n]
    day = [n for n in names if "/day/" in n]
    model_dir = dataset / "3D-models" / "aachen_v_1_1"
    model_dir.mkdir(parents=True)
    scene.true_model(db_names, stride=24).write_text(str(model_dir))  # the SIFT model stand-in (.txt)
    (dataset / "queries").mkdir()
    for kind, qs in (("night", night), ("day", day)):
        lines = []
        for q in qs:
            f = float(scene.focals[scene.index(q)])
            lines.append(f"{q} SIMPLE_RADIAL {IMAGE_SIZE[0]} {IMAGE_SIZE[1]} {f!r} {IMAGE_SIZE[0] / 2} "
                         f"{IMAGE_SIZE[1] / 2} 0.0")
        (dataset / "queries" / f"{kind}_time_queries_with_intrinsics.txt").write_text("\n".join(lines) + "\n")
    pairs = []                                       # "NetVLAD": db images by distance, 4 listed, 2 used
    for q in night + day:
        c = scene.centers[scene.index(q)]
        ranked = sorted(db_names, key=lambda d: np.linalg.norm(scene.centers[scene.index(d)] - c))
        pairs += [(q, d) for d in ranked[:4]]
    pairs_file = tmp_path / "pairs-query-netvlad50.txt"
    write_pairs(pairs_file, pairs)

    matcher = Matcher(SyntheticNetwork(scene), MATCHER_CONF, image_dir=images)
    outputs = tmp_path / "outputs"
    path = aachen.run(dataset, outputs, matcher, query_pairs=pairs_file, num_covis=2, num_loc=2, max_kps=2048,
                      progress=False)
    assert path == outputs / "Aachen-v1.1_mast3r-colmap.txt"
    covis = read_pairs(outputs / "pairs-db-covis2.txt")
    assert 0 < len(covis) <= 2 * len(db_names)
    lines = path.read_text().splitlines()
    queries = day + night                              # the query files in sorted order, then file order
    assert len(lines) == len(queries)
    assert [line.split()[0] for line in lines] == [Path(q).name for q in queries]
    for line in lines:
        fields = line.split()
        assert len(fields) == 8
        assert abs(np.linalg.norm([float(v) for v in fields[1:5]]) - 1) < 1e-9
    stats = ev.evaluate(path, {q: scene.cam_from_world(q) for q in queries},
                        thresholds=[(MAX_CENTER_REL * scene.scene_size, MAX_ROTATION_DEG)])
    assert stats["recall"][0]["recall"] == 1.0, stats["errors"]
    print("aachen stand-in: median errors %.2e (of the scene size) / %.4f deg, max %.2e / %.4f deg"
          % (stats["median_translation_error"] / scene.scene_size, stats["median_rotation_error_deg"],
             max(e[0] for e in stats["errors"].values()) / scene.scene_size,
             max(e[1] for e in stats["errors"].values())))
    logs = [json.loads(line) for line in (outputs / "Aachen-v1.1_mast3r-colmap_logs.jsonl").read_text().splitlines()]
    assert all(e["success"] and len(e["retrieved"]) == 2 for e in logs)
    summary = json.loads((outputs / "sfm_mast3r" / "summary.json").read_text())
    assert summary["num_registered_images"] == len(db_names) and summary["num_points3D"] > 300

    # every stage resumes: a second run matches nothing and writes the same file
    first = path.read_text()
    again = aachen.run(dataset, outputs, _MustNotMatch(matcher), query_pairs=pairs_file, num_covis=2, num_loc=2,
                       max_kps=2048, progress=False)
    assert again.read_text() == first


def test_aachen_cli_bad_input(tmp_path, monkeypatch, caplog):
    import mast3r_colmap.model.checkpoint as checkpoint

    def never(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(checkpoint, "load_model", never)
    with caplog.at_level(logging.ERROR):
        assert aachen.main(["--dataset", tmp_path / "nope", "--outputs", tmp_path / "out"]) == 2
        assert "does not exist" in caplog.text
        (tmp_path / "ds" / "images" / "images_upright").mkdir(parents=True)
        assert aachen.main(["--dataset", tmp_path / "ds", "--outputs", tmp_path / "out"]) == 2
        assert "has no cameras" in caplog.text
    args = aachen.build_parser().parse_args(["--dataset", "d", "--outputs", "o", "--cache-size", "7",
                                             "--num-workers", "0", "--batch-size", "3"])
    assert (args.cache_size, args.num_workers, args.batch_size) == (7, 0, 3)


# ----------------------------------------------------------------------------------------------
# real photos: the sacre_coeur night query with the small (untrained) test weights
# ----------------------------------------------------------------------------------------------


def test_sacre_coeur_night_query(small_pth, tmp_path):
    """Untrained weights: the map may be empty and the pose garbage, but the query gets exactly one line
    and a log entry, and a failure is reported with a reason, never raised."""
    from mast3r_colmap.model.checkpoint import load_model
    from mast3r_colmap.pipeline import PipelineConfig, reconstruct

    src = DATA / "sacre_coeur"
    images = tmp_path / "images"
    mapping_names = [f"mapping/{n}" for n in ("03903474_1471484089.jpg", "10265353_3838484249.jpg",
                                              "32809961_8274055477.jpg")]
    for name in mapping_names + ["query/night.jpg"]:
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / name, images / name)
    model = load_model(small_pth, device="cpu")
    matcher = Matcher(model, get_config("default", image_size=256), image_dir=images, checkpoint=str(small_pth))
    db = tmp_path / "database.db"
    summary = reconstruct(images, db, matcher, PipelineConfig(pairs="sequential:1", progress=False),
                          output_dir=tmp_path / "sparse", names=mapping_names)
    if summary.get("num_registered_images"):
        reference = pycolmap.Reconstruction(summary["model"])
    else:  # nothing registered: the mapping images at made-up poses, so that the query is matched all the same
        reference = pycolmap.Reconstruction()
        with pycolmap.Database.open(str(db)) as d:
            for img in d.read_all_images():
                if not reference.exists_camera(img.camera_id):
                    reference.add_camera_with_trivial_rig(d.read_camera(img.camera_id))
                kps = np.asarray(d.read_keypoints(img.image_id), np.float64)[:, :2]
                image = pycolmap.Image(name=img.name, keypoints=kps, camera_id=img.camera_id, image_id=img.image_id)
                reference.add_image_with_trivial_frame(
                    image, pycolmap.Rigid3d(pycolmap.Rotation3d(), np.array([float(img.image_id), 0.0, 0.0])))
    query = "query/night.jpg"
    results = loc.localize({query: None}, {query: mapping_names}, reference, colmap_db.existing_keypoints(db),
                           matcher, image_dir=images)
    out = loc.write_results(tmp_path / "results.txt", results)
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and lines[0].split()[0] == "night.jpg" and len(lines[0].split()) == 8
    logs = [json.loads(line) for line in loc.write_logs(loc.logs_path(out), results).read_text().splitlines()]
    assert len(logs) == 1 and logs[0]["name"] == query
    assert logs[0]["success"] or logs[0]["reason"]
    assert "matching" in logs[0]["time"] and logs[0]["retrieved"] == mapping_names   # the network did match it
    print("sacre_coeur: map %s, query %s" % ({k: summary.get(k) for k in ("num_registered_images", "num_points3D")},
                                               {k: logs[0][k] for k in ("success", "reason", "num_matches",
                                                                         "num_correspondences", "num_inliers")}))
