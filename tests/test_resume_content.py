"""Resume is keyed by content, and re-runs never mix settings.

Stored matches are reused only for unchanged image files (sha256, with a size + mtime fast path) and
unchanged weights (their digest, not the checkpoint path); a database records the pictures and settings
that filled it and refuses a re-run that differs, before any matching; ``overwrite`` starts afresh.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from conftest import DATA
from mast3r_colmap import store as store_module  # before pycolmap (see mast3r_colmap/__init__.py)

import pycolmap  # noqa: E402
from mast3r_colmap.export import provenance
from mast3r_colmap.keypoints import KeypointConfig
from mast3r_colmap.localization import triangulate_reference
from mast3r_colmap.mapping import database_from_reconstruction
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.model.checkpoint import load_model
from mast3r_colmap.pipeline import (PipelineConfig, database_settings, default_store_path, match_into_store,
                                    reconstruct, remove_run_files)
from mast3r_colmap.run import main
from mast3r_colmap.store import MatchStore, config_key
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene
from mast3r_colmap.testing.weights import write_official_pth
from test_pipeline_synthetic import _database_content

NAMES = [f"cam_{i:03d}.png" for i in range(5)]
ALL_PAIRS = [(a, b) for i, a in enumerate(NAMES) for b in NAMES[i + 1:]]


class CountingMatcher:
    """The Matcher over the synthetic oracle, recording the pairs it is asked to match.

    Its settings leave out the oracle's scene digest: scene B's oracle then stands for the *same*
    weights as scene A's, so that B's pictures under A's names are new pictures, not new weights.
    It reads the pictures of its own scene (``pictures``, the folder the ``scenes`` fixture wrote for it:
    the oracle describes its own scene's pictures), whatever a test puts in the folder it reconstructs.
    """

    def __init__(self, scene: SyntheticScene, pictures: Path, conf: str = "default"):
        self.base = Matcher(SyntheticNetwork(scene), get_config(conf, image_size=160), image_dir=pictures)
        self.matched: list = []

    def settings(self):
        return {key: value for key, value in self.base.settings().items() if key != "scene"}

    def match_pairs(self, pairs):
        pairs = list(pairs)
        self.matched.extend(pairs)
        return self.base.match_pairs(pairs)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Two synthetic scenes whose pictures share names: A (the first pictures) and B (new ones)."""
    pycolmap.logging.minloglevel = 2
    root = tmp_path_factory.mktemp("scenes")
    out = {}
    for key, seed in (("A", 3), ("B", 4)):
        scene = SyntheticScene.make(num_cameras=5, image_size=(320, 240), seed=seed, kind="planes")
        assert scene.names == NAMES
        scene.write_images(root / key)
        out[key] = (scene, root / key)
    return out


def _folder(scenes, tmp_path: Path, key: str = "A") -> Path:
    images = tmp_path / "images"
    shutil.copytree(scenes[key][1], images)
    return images


def _replace(scenes, images: Path, names) -> None:
    """Put scene B's pictures under the given names (same names, same size, other content)."""
    for name in names:
        shutil.copy(scenes["B"][1] / name, images / name)


def _config(**kw) -> PipelineConfig:
    return PipelineConfig(**{"pairs": "exhaustive", "camera_model": "PINHOLE", "mapper": "none",
                             "progress": False, **kw})


@pytest.fixture
def hash_reads(monkeypatch):
    """The paths whose bytes are hashed (the fast path reads none)."""
    reads = []
    original = store_module.file_sha256

    def counting(path):
        reads.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(store_module, "file_sha256", counting)
    return reads


def _content(db: Path) -> dict:
    recorded = provenance.read(db)
    return {**_database_content(db), "recorded_images": recorded.images, "recorded_settings": recorded.settings}


# ---- the match store ------------------------------------------------------------------------------

def test_store_recomputes_pairs_of_new_pictures(scenes, tmp_path):
    images = _folder(scenes, tmp_path)
    matcher = CountingMatcher(*scenes["A"])
    key = config_key(matcher.settings())
    with MatchStore(tmp_path / "m.sqlite", key, images) as store:
        assert match_into_store(matcher, ALL_PAIRS, store, progress=False) == 10
    _replace(scenes, images, ["cam_002.png"])
    matcher.matched.clear()
    with MatchStore(tmp_path / "m.sqlite", key, images) as store:
        assert len(store.done_pairs()) == 6
        assert ("cam_000.png", "cam_002.png") not in store and ("cam_000.png", "cam_001.png") in store
        with pytest.raises(KeyError):
            store.get("cam_002.png", "cam_004.png")
        assert match_into_store(matcher, ALL_PAIRS, store, progress=False) == 4
    assert sorted(matcher.matched) == [p for p in ALL_PAIRS if "cam_002.png" in p]
    with MatchStore(tmp_path / "m.sqlite", key, images) as store:
        assert match_into_store(matcher, ALL_PAIRS, store, progress=False) == 0
    with sqlite3.connect(str(tmp_path / "m.sqlite")) as con:  # stale rows were replaced, not added
        assert con.execute("SELECT COUNT(*) FROM pair_matches").fetchone()[0] == 10


def test_store_of_an_older_version_is_not_reused(scenes, tmp_path):
    images = _folder(scenes, tmp_path)
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(str(path)) as con:  # the schema before content hashes
        con.execute("CREATE TABLE pair_matches (config TEXT NOT NULL, name0 TEXT NOT NULL, name1 TEXT NOT NULL, "
                    "num INTEGER NOT NULL, xy0 BLOB NOT NULL, xy1 BLOB NOT NULL, scores BLOB NOT NULL, "
                    "PRIMARY KEY (config, name0, name1))")
        con.execute("INSERT INTO pair_matches VALUES ('k', 'cam_000.png', 'cam_001.png', 0, x'', x'', x'')")
    for image_dir in (images, None):
        with MatchStore(path, "k", image_dir) as store:
            assert store.done_pairs() == set()


def test_new_weights_at_the_same_checkpoint_path_are_recomputed(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pair = ("03903474_1471484089.jpg", "10265353_3838484249.jpg")
    for name in pair:
        shutil.copy(DATA / "sacre_coeur" / "mapping" / name, images / name)
    ckpt = tmp_path / "weights.pth"
    conf = get_config("default", image_size=256, num_workers=0)

    def run(seed_written: int | None) -> tuple:
        if seed_written is not None:
            write_official_pth(str(ckpt), "small", seed_written)
        matcher = Matcher(load_model(ckpt, device="cpu"), conf, image_dir=images, checkpoint=str(ckpt))
        settings = matcher.settings()
        with MatchStore(tmp_path / "m.sqlite", config_key(settings), images) as store:
            return match_into_store(matcher, [pair], store, progress=False), settings

    done, first = run(1)
    assert done == 1
    assert str(ckpt) not in json.dumps(first) and "weights.pth" not in json.dumps(first)
    assert run(None) == (0, first)          # same file, same weights: reused
    done, second = run(2)                   # new weights written to the same path
    assert done == 1 and second["weights"] != first["weights"]
    assert {k for k in first if first[k] != second[k]} == {"weights"}


# ---- unchanged files: nothing recomputed, nothing re-read --------------------------------------

def test_unchanged_run_recomputes_and_rereads_nothing(scenes, tmp_path, hash_reads):
    images = _folder(scenes, tmp_path)
    db = tmp_path / "database.db"
    first = CountingMatcher(*scenes["A"])
    reconstruct(images, db, first, _config())
    assert len(first.matched) == 10
    assert sorted(hash_reads) == NAMES  # each file read once, although checked twice
    before = _content(db)
    assert set(before["recorded_images"]) == set(NAMES)
    hash_reads.clear()
    again = CountingMatcher(*scenes["A"])
    reconstruct(images, db, again, _config())
    assert again.matched == [] and hash_reads == []
    assert _content(db) == before


def test_touched_file_with_the_same_bytes_is_reused(scenes, tmp_path, hash_reads):
    images = _folder(scenes, tmp_path)
    db = tmp_path / "database.db"
    reconstruct(images, db, CountingMatcher(*scenes["A"]), _config())
    before = _content(db)
    st = os.stat(images / "cam_003.png")
    os.utime(images / "cam_003.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    hash_reads.clear()
    again = CountingMatcher(*scenes["A"])
    reconstruct(images, db, again, _config())
    assert hash_reads == ["cam_003.png"]  # re-read once (new mtime), found unchanged
    assert again.matched == []
    assert _content(db) == before
    with MatchStore(default_store_path(db), config_key(again.settings()), images) as store:
        assert store.done_pairs() == {frozenset(p) for p in ALL_PAIRS}


# ---- the database: refused re-runs, allowed ones, overwrite ----------------------------------------

def test_new_pictures_under_old_names_are_refused(scenes, tmp_path):
    images = _folder(scenes, tmp_path)
    db = tmp_path / "database.db"
    reconstruct(images, db, CountingMatcher(*scenes["A"]), _config(mapper="incremental"),
                output_dir=tmp_path / "sparse")
    before = _content(db)
    _replace(scenes, images, ["cam_001.png", "cam_003.png"])
    again = CountingMatcher(*scenes["B"])
    with pytest.raises(ValueError) as err:
        reconstruct(images, db, again, _config())
    message = str(err.value)
    for name in ("cam_001.png", "cam_003.png"):
        old, new = before["recorded_images"][name][:12], store_module.file_sha256(images / name)[:12]
        assert f"image {name!r} changed (sha256 {old} -> {new})" in message
    assert "cam_000.png" not in message and "\n  setting" not in message
    assert "--overwrite" in message and "new database path" in message
    assert again.matched == []
    assert _content(db) == before  # refused before anything was written


def test_other_settings_are_refused(scenes, tmp_path):
    images = _folder(scenes, tmp_path)
    db = tmp_path / "database.db"
    reconstruct(images, db, CountingMatcher(*scenes["A"]), _config())
    before = _content(db)
    other_preset = CountingMatcher(*scenes["A"], "sfm")
    with pytest.raises(ValueError) as err:
        reconstruct(images, db, other_preset, _config())
    lines = [line.strip() for line in str(err.value).splitlines() if line.strip().startswith("setting")]
    assert lines == ['setting matcher.conf_threshold: 1.001 -> 0.0',
                     'setting matcher.mode: "nonsym" -> "symmetric"']
    with pytest.raises(ValueError, match=r"setting keypoints\.cell_size: 4\.0 -> 2\.0"):
        reconstruct(images, db, CountingMatcher(*scenes["A"]), _config(keypoints=KeypointConfig(cell_size=2.0)))
    assert other_preset.matched == []
    assert _content(db) == before


def test_more_pairs_and_images_are_a_normal_rerun(scenes, tmp_path):
    images = _folder(scenes, tmp_path)
    db = tmp_path / "database.db"
    first = CountingMatcher(*scenes["A"])
    reconstruct(images, db, first, _config(pairs="sequential:1"), names=NAMES[:4])
    assert len(first.matched) == 3
    more = CountingMatcher(*scenes["A"])
    reconstruct(images, db, more, _config())
    assert len(more.matched) == 7
    assert set(provenance.read(db).images) == set(NAMES)


def test_overwrite_starts_afresh(scenes, tmp_path):
    # reference: a first run on the new pictures
    ref_images = _folder(scenes, tmp_path / "ref", "B")
    reconstruct(ref_images, tmp_path / "ref" / "database.db", CountingMatcher(*scenes["B"]), _config())
    # a database filled from the old pictures, then the pictures change
    images = _folder(scenes, tmp_path / "run", "A")
    db = tmp_path / "run" / "database.db"
    reconstruct(images, db, CountingMatcher(*scenes["A"]), _config(keypoints=KeypointConfig(cell_size=2.0)))
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    _replace(scenes, images, NAMES)
    with pytest.raises(ValueError, match="--overwrite"):
        reconstruct(images, db, CountingMatcher(*scenes["B"]), _config())
    fresh = CountingMatcher(*scenes["B"])
    reconstruct(images, db, fresh, _config(), overwrite=True)
    assert len(fresh.matched) == 10
    assert _content(db) == _content(tmp_path / "ref" / "database.db")
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in images.iterdir()) == NAMES
    with sqlite3.connect(str(default_store_path(db))) as con:
        assert con.execute("SELECT COUNT(*) FROM pair_matches").fetchone()[0] == 10


def test_remove_run_files_deletes_only_the_database_and_the_store(tmp_path):
    db = tmp_path / "db.db"
    store = tmp_path / "custom.sqlite"
    ours = [db, tmp_path / "db.db-wal", tmp_path / "db.db-shm", store, tmp_path / "custom.sqlite-wal",
            tmp_path / "custom.sqlite-shm"]
    others = [tmp_path / "db.db.bak", tmp_path / "db.db.lock", tmp_path / "db.db.mast3r-matches.sqlite",
              tmp_path / "other.db-wal"]
    for path in ours + others:
        path.write_text("x")
    assert sorted(remove_run_files(db, store)) == sorted(ours)
    assert [p for p in ours if p.exists()] == [] and all(p.exists() for p in others)
    assert remove_run_files(db) == [tmp_path / "db.db.mast3r-matches.sqlite"]  # the default store


# ---- reference databases (localisation) ------------------------------------------------------------

def test_reference_database_takes_the_settings_of_its_first_matching_run(scenes, tmp_path):
    scene, images = scenes["A"]
    reference = scene.reconstruction()
    db = tmp_path / "database.db"
    database_from_reconstruction(reference, db)
    assert provenance.read(db) == provenance.Provenance()
    pairs = ALL_PAIRS[:6]
    matcher = CountingMatcher(scene, images)
    model = triangulate_reference(reference, images, db, matcher, pairs, tmp_path / "sfm")
    assert model.num_points3D() > 100 and len(matcher.matched) == 6
    expected = provenance.flatten_settings(database_settings(matcher, KeypointConfig()))
    assert provenance.read(db) == provenance.Provenance({}, expected)  # no image folder: settings only
    again = CountingMatcher(scene, images)
    triangulate_reference(reference, images, db, again, pairs, tmp_path / "sfm")
    assert again.matched == []
    with pytest.raises(ValueError, match=r'setting matcher\.mode: "nonsym" -> "symmetric"'):
        triangulate_reference(reference, images, db, CountingMatcher(scene, images, "sfm"), pairs, tmp_path / "sfm")


# ---- the command line --------------------------------------------------------------------------------

def test_cli_refuses_other_preset_or_weights_and_overwrites(tmp_path, caplog, presets_at_256):
    # every preset at 256 px (presets_at_256): the settings that differ between presets stay mode and conf_threshold
    images = tmp_path / "images"
    images.mkdir()
    for name in ("03903474_1471484089.jpg", "10265353_3838484249.jpg"):
        shutil.copy(DATA / "sacre_coeur" / "mapping" / name, images / name)
    ckpt, db = tmp_path / "weights.pth", tmp_path / "db.db"
    write_official_pth(str(ckpt), "small", 1)

    def run(*extra) -> tuple:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = main([str(images), str(db), "--checkpoint", str(ckpt), "--mapper", "none", "--no-progress",
                         *extra])
        return code, caplog.text

    assert run()[0] == 0
    assert run()[0] == 0  # same settings, same files: resumes
    code, log = run("--preset", "sfm")
    assert code == 2 and 'setting matcher.mode: "nonsym" -> "symmetric"' in log and "--overwrite" in log
    recorded = provenance.read(db)
    write_official_pth(str(ckpt), "small", 2)  # new weights, same path
    code, log = run()
    assert code == 2 and f"setting matcher.weights: \"{recorded.settings['matcher.weights'][1:-1]}\" -> " in log
    assert provenance.read(db) == recorded
    code, log = run("--overwrite")
    assert code == 0 and "deleted" in log
    new = provenance.read(db)
    assert new.images == recorded.images and new.settings["matcher.weights"] != recorded.settings["matcher.weights"]
    with pycolmap.Database.open(str(db)) as d:
        assert d.num_images() == 2 and d.num_matched_image_pairs() == 1
