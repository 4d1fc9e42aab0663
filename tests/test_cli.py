"""The command line: bad input gets a clear message and exit code 2, never a traceback."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import DATA
from mast3r_colmap.pipeline import usable_images
from mast3r_colmap.images import ImageLoadError
from mast3r_colmap.run import EXIT_BAD_INPUT, main

SACRE_COEUR = DATA / "sacre_coeur" / "mapping"


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("03903474_1471484089.jpg", "10265353_3838484249.jpg"):
        shutil.copy(SACRE_COEUR / name, folder / name)
    return folder


def _run(argv, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main([str(a) for a in argv] + ["--no-progress"])
    return code, caplog.text


def test_help():
    out = subprocess.run([sys.executable, "-m", "mast3r_colmap.run", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--pairs", "--checkpoint", "--device", "--preset", "--camera-mode", "--export-h5", "--mapper",
                 "--output", "--strict", "--batch-size", "--cache-size", "--num-workers"):
        assert flag in out.stdout


def test_missing_folder(tmp_path, caplog):
    code, log = _run([tmp_path / "nope", tmp_path / "db.db"], caplog)
    assert code == EXIT_BAD_INPUT and "does not exist" in log and "Traceback" not in log


def test_empty_folder(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    code, log = _run([tmp_path / "empty", tmp_path / "db.db"], caplog)
    assert code == EXIT_BAD_INPUT and "no images found" in log


def test_corrupt_image_is_fatal_with_strict(images, tmp_path, caplog):
    (images / "broken.jpg").write_bytes((SACRE_COEUR / "02928139_3448003521.jpg").read_bytes()[:2000])
    code, log = _run([images, tmp_path / "db.db", "--strict", "--checkpoint", tmp_path / "unused.pth"], caplog)
    assert code == EXIT_BAD_INPUT and "broken.jpg" in log
    assert not (tmp_path / "db.db").exists()  # failed before anything was written


def test_corrupt_images_are_skipped_by_default(images, caplog):
    (images / "broken.jpg").write_bytes((SACRE_COEUR / "02928139_3448003521.jpg").read_bytes()[:2000])
    (images / "empty.png").write_bytes(b"")
    (images / "text.jpg").write_text("hello")
    with caplog.at_level(logging.WARNING):
        names = usable_images(images, strict=False, progress=False)
    assert names == ["03903474_1471484089.jpg", "10265353_3838484249.jpg"]
    for bad in ("broken.jpg", "empty.png", "text.jpg"):
        assert bad in caplog.text
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        usable_images(images, strict=True, progress=False)


def test_too_few_images(tmp_path, caplog):
    folder = tmp_path / "one"
    folder.mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(folder / "a.png")
    code, log = _run([folder, tmp_path / "db.db"], caplog)
    assert code == EXIT_BAD_INPUT and "at least 2 readable images" in log


def test_missing_checkpoint(images, tmp_path, caplog):
    code, log = _run([images, tmp_path / "db.db", "--checkpoint", tmp_path / "missing.pth"], caplog)
    assert code == EXIT_BAD_INPUT and "missing.pth" in log and "not found" in log


def test_offline_default_checkpoint(images, tmp_path, caplog, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, log = _run([images, tmp_path / "db.db"], caplog)
    assert code == EXIT_BAD_INPUT
    assert "naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric" in log and "--checkpoint" in log


def test_corrupt_checkpoint(images, tmp_path, caplog):
    (tmp_path / "bad.pth").write_bytes(b"\x80\x02 not a checkpoint")
    code, log = _run([images, tmp_path / "db.db", "--checkpoint", tmp_path / "bad.pth"], caplog)
    assert code == EXIT_BAD_INPUT and "bad.pth" in log


def test_unwritable_output(images, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code, log = _run([images, blocker / "db.db"], caplog)
    assert code == EXIT_BAD_INPUT and "not writable" in log
    code, log = _run([images, tmp_path / "db.db", "--output", blocker / "sparse"], caplog)
    assert code == EXIT_BAD_INPUT and "not writable" in log


def test_bad_pairs_spec(images, tmp_path, caplog, small_pth):
    code, log = _run([images, tmp_path / "db.db", "--checkpoint", small_pth, "--pairs", "sequential:0"], caplog)
    assert code == EXIT_BAD_INPUT and "sequential:0" in log


def test_database_is_a_folder(images, tmp_path, caplog):
    code, log = _run([images, tmp_path], caplog)
    assert code == EXIT_BAD_INPUT and "is a folder" in log


def test_bad_matcher_resources(images, tmp_path, caplog):
    for flag, value in (("--num-workers", "-1"), ("--cache-size", "0"), ("--batch-size", "0")):
        code, log = _run([images, tmp_path / "db.db", "--checkpoint", tmp_path / "unused.pth", flag, value], caplog)
        assert code == EXIT_BAD_INPUT and flag[2:].replace("-", "_") in log and "Traceback" not in log, flag
