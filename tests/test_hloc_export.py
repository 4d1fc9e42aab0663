"""The hloc export of a run is complete and readable by hloc's own code, also on re-runs."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pycolmap
import pytest

from conftest import DATA
from mast3r_colmap.export import hloc_h5
from mast3r_colmap.export.colmap_db import image_ids, read_pair_matches
from mast3r_colmap.pairs import exhaustive, read_pairs
from mast3r_colmap.run import main
from mast3r_colmap.structures import ImageKeypoints, IndexMatches

SACRE_COEUR = DATA / "sacre_coeur" / "mapping"
NAMES = ["03903474_1471484089.jpg", "10265353_3838484249.jpg", "17295357_9106075285.jpg"]


def _cli(*argv) -> int:
    return main([str(a) for a in argv] + ["--no-progress", "--mapper", "none"])


def test_export_on_a_rerun_into_a_new_folder_is_complete(tmp_path, small_pth, hloc, presets_at_256):
    from hloc.utils.io import get_keypoints, get_matches

    images = tmp_path / "images"
    images.mkdir()
    for name in NAMES:
        shutil.copy(SACRE_COEUR / name, images / name)
    db = tmp_path / "db.db"
    assert _cli(images, db, "--checkpoint", small_pth) == 0
    # the re-run matches nothing; its export must still hold every image and pair, from the database
    assert _cli(images, db, "--checkpoint", small_pth, "--export-h5", tmp_path / "h5") == 0
    pairs = read_pairs(tmp_path / "h5" / "pairs.txt")
    assert sorted(map(frozenset, pairs)) == sorted(map(frozenset, exhaustive(NAMES)))
    with pycolmap.Database.open(str(db)) as d:
        ids = image_ids(d)
        for name in NAMES:
            stored = np.asarray(d.read_keypoints(ids[name]))[:, :2] - 0.5
            np.testing.assert_allclose(get_keypoints(tmp_path / "h5" / "features.h5", name), stored, atol=1e-4)
        for n0, n1 in pairs:
            m, s = get_matches(tmp_path / "h5" / "matches.h5", n0, n1)
            np.testing.assert_array_equal(np.asarray(m), read_pair_matches(d, ids, n0, n1))
            assert np.isfinite(s).all() and len(s) == len(m)
            assert len(m) > 0


def test_match_scores_keep_range_and_order(tmp_path):
    scores = np.array([1.0, 70000.0, 3.5e6, 1.25], np.float32)  # float16 would give 65504 / inf
    path = tmp_path / "matches.h5"
    hloc_h5.write_matches(path, [IndexMatches("a", "b", np.array([[0, 1], [1, 0], [2, 3], [3, 2]]), scores)],
                          {"a": 4})
    with h5py.File(path, "r") as f:
        stored = f[hloc_h5.names_to_pair("a", "b")]["matching_scores0"][()]
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, scores)


def test_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "features.h5"
    hloc_h5.write_features(path, [ImageKeypoints("a", [[1.0, 2.0]])])
    before = path.read_bytes()

    class Boom(ImageKeypoints):
        @property
        def keypoints(self):
            raise RuntimeError("crash in the middle of the write")

        @keypoints.setter
        def keypoints(self, value):
            pass

    with pytest.raises(RuntimeError, match="crash"):
        hloc_h5.write_features(path, [ImageKeypoints("b", [[3.0, 4.0]]), Boom("c", [[0.0, 0.0]])])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.h5"]  # no temporary file left
