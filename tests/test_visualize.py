"""Pictures (``python -m mast3r_colmap.visualize``, ``write_overview``): the PNGs have the size of their
layout and show something where the matches and keypoints are: inliers in the score colours, outliers red,
keypoints with a 3D point green; the two images sit left and right; bad input exits with 2.

The scene is test_export's (4 images, 300 points, 10 % outlier matches); its image files are replaced by
plain grey pictures of a different level each, so that what is drawn over them is told apart exactly.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import mast3r_colmap  # noqa: F401  (before pycolmap: see mast3r_colmap/__init__.py)
import numpy as np
import pycolmap
import pytest
from PIL import Image

from mast3r_colmap import mapping, visualize
from mast3r_colmap.export import scores
from mast3r_colmap.pipeline import export_hloc
from mast3r_colmap.verification import verify_matches
from test_export import H, W, Scene, build_database, make_scene

LEVELS = (40, 100, 160, 220)  # grey level of each picture
PAIR = ("seq/img01.png", "seq/img00.png")  # stored in this order (test_export writes half the pairs reversed)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vis")
    scene = make_scene(root, n_images=4, n_points=300, seed=1)
    for name, level in zip(scene.names, LEVELS):
        Image.new("RGB", (W, H), (level,) * 3).save(scene.image_dir / name)
    db = root / "database.db"
    ids = build_database(scene, db)
    scores.record(db, ids, {}, scene.matches)
    verify_matches(db, [m.pair for m in scene.matches])
    rec = mapping.incremental(db, scene.image_dir, root / "sparse")
    assert rec is not None and rec.num_reg_images() == 4
    export_hloc(root / "h5", db, scene.image_dir, [m.pair for m in scene.matches])
    return {"root": root, "scene": scene, "db": db, "ids": ids, "images": scene.image_dir,
            "sparse": root / "sparse", "h5": root / "h5"}


def _main(argv, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = visualize.main([str(a) for a in argv])
    return code, caplog.text


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(np.int64)


def _pixels(fig, ax, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the PNG pixels holding the data points ``xy`` of ``ax``."""
    d = ax.transData.transform(np.asarray(xy, np.float64))
    height = fig.canvas.get_width_height()[1]
    return np.floor(height - d[:, 1]).astype(int), np.floor(d[:, 0]).astype(int)


def _faded(level: int) -> int:
    return int(round(level * (1 - visualize.FADE) + 255 * visualize.FADE))


def _red(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] > 200) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)


def _green(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 1] > rgb[..., 0] + 60) & (rgb[..., 1] > rgb[..., 2] + 60)


def _scene_pair(scene: Scene, name0: str, name1: str):
    m = next(m for m in scene.matches if m.pair == (name0, name1))
    return m, scene.inlier_masks[(name0, name1)]


# ---- matches --------------------------------------------------------------------------------------


def test_read_pair_from_database_and_h5(run):
    scene, db = run["scene"], run["db"]
    m, mask = _scene_pair(scene, *PAIR)
    view = visualize.read_pair(db, *PAIR)
    kp0, kp1 = (scene.keypoints[n].keypoints for n in PAIR)
    np.testing.assert_allclose(view.xy0, kp0[m.matches[:, 0]], atol=1e-4)
    np.testing.assert_allclose(view.xy1, kp1[m.matches[:, 1]], atol=1e-4)
    np.testing.assert_array_equal(view.scores, m.scores.astype(np.float32))
    with pycolmap.Database.open(str(db)) as d:
        verified = d.read_two_view_geometry(run["ids"][PAIR[0]], run["ids"][PAIR[1]]).inlier_matches
    assert view.inliers.sum() == len(verified) == 301 and len(view.xy0) == 315
    assert view.inliers[mask].all()  # the scene's true matches are all inliers (one outlier passes by chance)
    assert view.sizes == ((W, H), (W, H))
    swapped = visualize.read_pair(db, PAIR[1], PAIR[0])
    np.testing.assert_array_equal(swapped.xy0, view.xy1)
    np.testing.assert_array_equal(swapped.inliers, view.inliers)
    np.testing.assert_array_equal(swapped.scores, view.scores)
    for source in (run["h5"], run["h5"] / "matches.h5"):
        for names, flip in ((PAIR, False), (PAIR[::-1], True)):
            h5 = visualize.read_pair(source, *names)
            assert h5.inliers is None and h5.sizes == ((W, H), (W, H))
            order0, order1 = (view.xy1, view.xy0) if flip else (view.xy0, view.xy1)
            # matches0 lists image 0's keypoints in index order: compare as sets of rows
            got = np.concatenate([h5.xy0, h5.xy1, h5.scores[:, None]], 1)
            want = np.concatenate([order0, order1, view.scores[:, None]], 1)
            np.testing.assert_allclose(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])], atol=1e-4)


def test_matches_picture(run, tmp_path, caplog):
    out = tmp_path / "m.png"
    code, log = _main(["matches", run["db"], *PAIR, "--images", run["images"], "-o", out], caplog)
    assert code == 0, log
    png = _png(out)
    gap = visualize.matches_gap((W, H), (W, H))
    assert gap == 13
    assert png.shape == (visualize.HEADER_PX + round(H * 1600 / (2 * W + gap)) + visualize.FOOTER_PX, 1600, 3)
    assert png.shape[:2] == (674, 1600)

    view = visualize.read_pair(run["db"], *PAIR)
    fig = visualize.plot_matches(view, *(visualize.read_image(run["images"] / n) for n in PAIR))
    assert fig.canvas.get_width_height() == (1600, 674)
    ax = fig.axes[0]
    background = [_faded(LEVELS[1]), _faded(LEVELS[0])]  # PAIR is (img01, img00)
    # the two pictures: left and right of the gap, each at its own grey level where nothing is drawn
    top, bottom = visualize.HEADER_PX, png.shape[0] - visualize.FOOTER_PX
    left, right = png[top:bottom, :780], png[top:bottom, 820:]
    for panel, level in ((left, background[0]), (right, background[1])):
        assert np.median(panel.reshape(-1, 3), axis=0).tolist() == [level] * 3
    # every end of every match is drawn over
    offset = np.array([W + gap, 0.0])
    ends = []
    for xy, level in ((view.xy0, background[0]), (view.xy1 + offset, background[1])):
        rows, cols = _pixels(fig, ax, xy)
        drawn = np.abs(png[rows, cols] - level).max(axis=1) > 10
        assert drawn.mean() > 0.98, f"{(~drawn).sum()} of {len(drawn)} match ends not drawn"
        ends.append(png[rows, cols])
    ends = np.concatenate(ends)
    inl = np.concatenate([view.inliers, view.inliers])
    assert _red(ends[~inl]).all()                    # outliers: red, drawn on top
    # inliers: the colour of their score, but where another dot or an outlier line lies on top
    from matplotlib import colormaps

    lo, hi = np.percentile(view.scores, [2, 98])
    colours = colormaps["viridis"](np.clip((view.scores - lo) / (hi - lo), 0, 1))[:, :3] * 255
    expected = np.concatenate([colours, colours])[inl]
    exact = np.abs(ends[inl] - expected).max(axis=1) <= 2
    assert exact.mean() > 0.9, exact.mean()
    assert len(set(map(tuple, ends[inl][exact]))) > 100   # coloured by score, not one colour
    assert _red(png[top:bottom]).sum() > 200         # outlier lines


def test_large_images_are_shrunk_in_place(tmp_path):
    """Images much larger than drawn are box-filtered first; they keep their place (2001 px wide: the
    last box is partial)."""
    big0, big1 = (np.full((1001, 2001, 3), v, np.uint8) for v in (0, 250))
    view = visualize.PairView("a", "b", np.array([[1000.0, 500.0]]), np.array([[0.0, 0.0]]), None, None)
    fig = visualize.plot_matches(view, big0, big1, width=400, fade=None)
    visualize.save_figure(fig, tmp_path / "big.png")
    png = _png(tmp_path / "big.png")[visualize.HEADER_PX + 5]
    gap = visualize.matches_gap((2001, 1001), (2001, 1001))
    scale = 400 / (2 * 2001 + gap)
    assert gap == 40 and png.shape == (400, 3)
    assert png[int(2001 * scale) - 1].tolist() == [0, 0, 0] and png[int(2001 * scale) + 1].tolist() == [255] * 3
    assert png[int((2001 + gap) * scale) - 1].tolist() == [255] * 3
    assert png[int((2001 + gap) * scale) + 1].tolist() == [250] * 3 and png[-1].tolist() == [250] * 3


def test_matches_picture_from_h5_has_no_outliers(run, tmp_path, caplog):
    out = tmp_path / "h5.png"
    code, log = _main(["matches", run["h5"], *PAIR, "--images", run["images"], "-o", out, "--width", "800"], caplog)
    assert code == 0, log
    png = _png(out)
    assert png.shape[:2] == (visualize.HEADER_PX + round(H * 800 / (2 * W + 13)) + visualize.FOOTER_PX, 800)
    assert _red(png[visualize.HEADER_PX:-visualize.FOOTER_PX]).sum() == 0   # not verified: no outliers


def test_image_paths_instead_of_names(run, tmp_path, caplog):
    by_name, by_path = tmp_path / "a.png", tmp_path / "b.png"
    small = ["--width", "400"]
    assert _main(["matches", run["db"], *PAIR, "--images", run["images"], "-o", by_name, *small], caplog)[0] == 0
    code, log = _main(["matches", run["db"], *(run["images"] / n for n in PAIR), "-o", by_path, *small], caplog)
    assert code == 0, log
    np.testing.assert_array_equal(_png(by_path), _png(by_name))


# ---- model ----------------------------------------------------------------------------------------


def test_model_picture(run, tmp_path, caplog):
    out = tmp_path / "model.png"
    code, log = _main(["model", run["sparse"], "--images", run["images"], "-o", out], caplog)
    assert code == 0, log
    png = _png(out)
    # title 26 + view title 18 + views 0.26 * 1600 + ticks 30 + image title 18 + (1600/4 - 8) * 3/4 + 4
    assert png.shape[:2] == (26 + 18 + 416 + 30 + 18 + 294 + 4, 1600) == (806, 1600)
    rec = pycolmap.Reconstruction(str(run["sparse"]))
    fig = visualize.plot_model(rec, run["images"], title=str(run["sparse"]))
    assert fig.canvas.get_width_height() == (1600, 806)
    views, coverage = fig.axes[:2], fig.axes[2:]
    assert len(coverage) == 4
    for ax in views:  # points (grey: the model has no colours) and 4 red cameras in both views
        (x0, y0), (x1, y1) = ax.get_window_extent().get_points()
        panel = png[806 - int(y1) + 2:806 - int(y0) - 2, int(x0) + 2:int(x1) - 2]
        grey = (np.abs(panel - panel[..., :1]).max(-1) < 10) & (panel[..., 0] < 200)
        assert grey.sum() > 150 and _red(panel).sum() > 4 * 10
    images = sorted((rec.image(i) for i in rec.reg_image_ids()), key=lambda im: im.name)
    for ax, im in zip(coverage, images):
        xy = np.array([p.xy for p in im.points2D]) - 0.5
        has = np.array([p.has_point3D() for p in im.points2D])
        rows, cols = _pixels(fig, ax, xy)
        assert _green(png[rows[has], cols[has]]).mean() > 0.95
        assert not _green(png[rows[~has], cols[~has]]).any() and has.sum() >= 300


def test_model_picture_without_images(run, tmp_path, caplog):
    out = tmp_path / "blank.png"
    code, log = _main(["model", run["sparse"], "--num-images", "2", "--width", "600", "-o", out], caplog)
    assert code == 0, log
    png = _png(out)
    rec = pycolmap.Reconstruction(str(run["sparse"]))
    fig = visualize.plot_model(rec, None, num_images=2, width=600)
    assert png.shape[:2] == fig.canvas.get_width_height()[::-1] and len(fig.axes) == 4
    (x0, y0), (x1, y1) = fig.axes[2].get_window_extent().get_points()
    corner = png[png.shape[0] - int(y1) + 1, int(x0) + 1]
    assert corner.tolist() == [visualize.BLANK] * 3


def test_image_folder_from_the_run_report(run, tmp_path, caplog):
    """Without --images, the folder recorded in the run's report (settings.image_dir) is used: the pictures
    equal those drawn with --images; a report naming a folder that is gone is ignored (blank canvases)."""
    small = ["--width", "400", "--num-images", "2"]
    with_images, from_report, gone = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    sparse = tmp_path / "sparse"
    shutil.copytree(run["sparse"], sparse)
    (sparse / "report.json").write_text(json.dumps({"settings": {"image_dir": str(run["images"])}}))
    assert _main(["model", sparse, "--images", run["images"], "-o", with_images, *small], caplog)[0] == 0
    code, log = _main(["model", sparse, "-o", from_report, *small], caplog)
    assert code == 0 and f"images from the run report {sparse / 'report.json'}" in log, log
    np.testing.assert_array_equal(_png(from_report), _png(with_images))
    (sparse / "report.json").write_text(json.dumps({"settings": {"image_dir": str(tmp_path / "nope")}}))
    assert _main(["model", sparse, "-o", gone, *small], caplog)[0] == 0
    assert not np.array_equal(_png(gone), _png(with_images))
    # matches of a database: the report beside it (--mapper none) or in its default model folder
    db = tmp_path / "database.db"
    shutil.copy(run["db"], db)
    for report in (tmp_path / "database.db.report.json", tmp_path / "sparse" / "report.json"):
        report.write_text(json.dumps({"settings": {"image_dir": str(run["images"])}}))
        out = tmp_path / f"{report.parent.name}.png"
        code, log = _main(["matches", db, *PAIR, "-o", out, "--width", "400"], caplog)
        assert code == 0 and f"images from the run report {report}" in log, log
        report.unlink()
    code, log = _main(["matches", db, *PAIR, "-o", tmp_path / "none.png"], caplog)
    assert code == 2 and "--images DIR" in log


# ---- the overview of a run ------------------------------------------------------------------------


def test_write_overview(run, tmp_path):
    ranked = visualize.pairs_by_inliers(run["db"])
    assert len(ranked) == 6 and [r[0] for r in ranked] == sorted((r[0] for r in ranked), reverse=True)
    with pycolmap.Database.open(str(run["db"])) as d:
        for count, n0, n1 in ranked:
            assert count == len(d.read_two_view_geometry(run["ids"][n0], run["ids"][n1]).inlier_matches)
    out = tmp_path / "plots"
    paths = visualize.write_overview(run["db"], run["images"], run["sparse"], out, num_pairs=2, width=400)
    names = ["matches_most_inliers_1.png", "matches_most_inliers_2.png", "matches_fewest_inliers_1.png",
             "matches_fewest_inliers_2.png", "model.png"]
    assert [p.name for p in paths] == names and sorted(p.name for p in out.iterdir()) == sorted(names)
    assert _png(out / "model.png").shape[1] == 400 and _png(out / "matches_most_inliers_1.png").shape[1] == 400
    # a second overview with fewer pairs and no model leaves no stale picture
    visualize.write_overview(run["db"], run["images"], None, out, num_pairs=1, width=400)
    assert sorted(p.name for p in out.iterdir()) == ["matches_fewest_inliers_1.png", "matches_most_inliers_1.png"]


def test_run_plots(tmp_path, monkeypatch, caplog):
    """``mast3r-colmap --plots`` calls :func:`write_overview` with the run's model, into the model folder's
    ``plots/``, or into ``DATABASE.plots/`` with ``--mapper none`` (drawing failures are logged, not raised)."""
    from mast3r_colmap import run as run_cli

    calls = []
    monkeypatch.setattr(visualize, "write_overview", lambda *a: calls.append(a))
    images, db = tmp_path / "images", tmp_path / "work" / "db.db"
    parse = run_cli.build_parser().parse_args
    assert not parse([str(images), str(db)]).plots
    run_cli._write_plots(parse([str(images), str(db), "--plots", "--mapper", "none"]), {"num_images": 4})
    run_cli._write_plots(parse([str(images), str(db), "--plots"]), {"model": "m"})
    run_cli._write_plots(parse([str(images), str(db), "--plots", "--output", str(tmp_path / "out")]), {})
    assert calls == [(db, images, None, tmp_path / "work" / "db.db.plots"),
                     (db, images, "m", tmp_path / "work" / "sparse" / "plots"),
                     (db, images, None, tmp_path / "out" / "plots")]
    monkeypatch.setattr(visualize, "write_overview", lambda *a: (_ for _ in ()).throw(ValueError("no picture")))
    with caplog.at_level(logging.ERROR):
        run_cli._write_plots(parse([str(images), str(db), "--plots"]), {})   # logged, not raised
    assert "could not draw the pictures" in caplog.text and "no picture" in caplog.text


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, message", [
    ("unknown image", "unknown image 'nope.png'"),
    ("missing database", "does not exist"),
    ("not a database", "neither a COLMAP database nor an hloc matches.h5"),
    ("other SQLite file", "an SQLite file but not a COLMAP database"),
    ("no image folder", "--images DIR"),
    ("wrong image folder", "wrong image folder"),
    ("not a model", "has no cameras.bin or cameras.txt"),
    ("bad format", "unknown picture format 'xyz'"),
])
def test_bad_input(run, tmp_path, caplog, case, message):
    out = tmp_path / "out.png"
    matches = ["matches", run["db"], *PAIR, "--images", run["images"], "-o", out]
    other = tmp_path / "other"
    other.mkdir()
    for name in PAIR:
        (other / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (W // 2, H // 2)).save(other / name)
    (tmp_path / "text.db").write_text("not a database")
    with sqlite3.connect(tmp_path / "other.db") as con:
        con.execute("CREATE TABLE notes (text TEXT)")
    argv = {
        "unknown image": ["matches", run["db"], "nope.png", PAIR[1], "--images", run["images"], "-o", out],
        "missing database": ["matches", tmp_path / "missing.db", *PAIR, "--images", run["images"], "-o", out],
        "not a database": ["matches", tmp_path / "text.db", *PAIR, "--images", run["images"], "-o", out],
        "other SQLite file": ["matches", tmp_path / "other.db", *PAIR, "--images", run["images"], "-o", out],
        "no image folder": ["matches", run["db"], *PAIR, "-o", out],
        "wrong image folder": ["matches", run["db"], *PAIR, "--images", other, "-o", out],
        "not a model": ["model", run["images"], "-o", out],
        "bad format": matches[:-1] + [tmp_path / "out.xyz"],
    }[case]
    before = (tmp_path / "other.db").read_bytes()
    code, log = _main(argv, caplog)
    assert code == 2 and message in log, log
    assert not out.exists() and not (tmp_path / "out.xyz").exists()
    assert (tmp_path / "other.db").read_bytes() == before   # never written to


def test_readme_commands_parse():
    """The README's "Pictures" commands name this command line's subcommands and flags."""
    import re
    import shlex

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Pictures"):]
    section = section[:section.index("\n## ", 1)]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()
             if line.startswith("python -m mast3r_colmap.visualize ")]
    assert len(lines) == 2
    for line in lines:
        args = visualize.build_parser().parse_args(shlex.split(line)[3:])
        assert args.command in ("matches", "model") and args.output.name.endswith(".png")


def test_matplotlib_is_loaded_only_to_draw_and_pyplot_never():
    code = ("import sys, numpy as np, mast3r_colmap.visualize as v; assert 'matplotlib' not in sys.modules; "
            "view = v.PairView('a', 'b', np.zeros((1, 2)), np.zeros((1, 2)), None, None); "
            "img = np.zeros((8, 8, 3), np.uint8); v.plot_matches(view, img, img).canvas.draw(); "
            "print('matplotlib' in sys.modules, 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]
