"""The README's main job on the bundled example, with the small test checkpoint (untrained weights)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pycolmap
import pytest

from mast3r_colmap.images import list_images
from mast3r_colmap.run import EXIT_NO_MODEL, main

EXAMPLE = Path(__file__).parents[1] / "examples" / "sacre_coeur" / "images"


@pytest.mark.slow
def test_readme_main_job_on_the_example(tmp_path, small_pth, capsys, presets_at_256):
    # at 256 px (presets_at_256): the untrained weights' matches mean nothing at any size; the test is about the run
    # and what it writes
    db = tmp_path / "database.db"
    code = main([str(EXAMPLE), str(db), "--checkpoint", str(small_pth), "--pairs", "sequential:2",
                 "--export-h5", str(tmp_path / "h5"), "--output", str(tmp_path / "sparse"), "--no-progress"])
    # untrained weights: every pair passes verification, but the mapper registers no image (documented: exit 3)
    assert code == EXIT_NO_MODEL
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_registered_images"] == 0 and summary["num_verified_pairs"] == 7
    names = list_images(EXAMPLE)
    assert summary["num_images"] == len(names) == 5 and summary["num_pairs"] == 7
    with pycolmap.Database.open(str(db)) as d:
        assert sorted(im.name for im in d.read_all_images()) == names
        assert d.num_cameras() == 5  # 'auto' camera mode: the five photos have five sizes
        sizes = {im.name: (d.read_camera(im.camera_id).width, d.read_camera(im.camera_id).height)
                 for im in d.read_all_images()}
        for im in d.read_all_images():
            kps = np.asarray(d.read_keypoints(im.image_id))[:, :2]
            w, h = sizes[im.name]
            assert len(kps) > 0 and kps.min() >= 0 and (kps[:, 0] <= w).all() and (kps[:, 1] <= h).all()
        assert d.num_matches() > 0
    with h5py.File(tmp_path / "h5" / "features.h5", "r") as f:
        for name in names:
            assert f[name]["keypoints"].dtype == np.float32
            assert tuple(f[name]["image_size"][()]) == sizes[name]
    assert (tmp_path / "h5" / "pairs.txt").read_text().count("\n") == 6  # 7 pairs, no trailing newline
    assert (tmp_path / "database.db.mast3r-matches.sqlite").is_file()


def test_readme_python_example(small_pth, capsys, monkeypatch, presets_at_256):
    """The README's Python block runs as written (with the test checkpoint instead of the hub weights; its
    match_pair with the "default" preset at 256 px, presets_at_256)."""
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert "model = load_model()" in code
    code = code.replace("model = load_model()", f"model = load_model({str(small_pth)!r})")
    monkeypatch.chdir(Path(__file__).parents[1])
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert set(scope["pred1"]) == {"pts3d", "conf", "desc", "desc_conf"}
    assert set(scope["pred2"]) == {"pts3d_in_other_view", "conf", "desc", "desc_conf"}
    m = scope["m"]
    assert len(m) > 0 and m.xy0.shape == (len(m), 2)
