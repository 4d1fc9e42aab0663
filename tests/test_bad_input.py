"""The command line on the bad inputs and faults a real user produces: one table, one row per case.

Each row builds a folder, runs ``python -m mast3r_colmap.run`` (in process, through ``main``) and checks
the exit code, the message, and that no file that existed before the run changed. Rows that must
succeed (odd but valid images and names) run the whole pipeline up to the database with the small
deterministic test weights (``--mapper none``: untrained weights give meaningless matches).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pycolmap
import pytest
from PIL import Image

from conftest import DATA
from mast3r_colmap.run import main
from mast3r_colmap.cli import EXIT_BAD_INPUT

SACRE_COEUR = DATA / "sacre_coeur" / "mapping"
JPEG_A, JPEG_B = SACRE_COEUR / "03903474_1471484089.jpg", SACRE_COEUR / "10265353_3838484249.jpg"


def _snapshot(root: Path) -> dict:
    """sha256 of every file below root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _two_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(JPEG_A, folder / "a.jpg")
    shutil.copy(JPEG_B, folder / "b.jpg")
    return folder


@dataclass
class Case:
    """A folder layout (``setup(tmp) -> argv``), the expected exit code and message fragments."""

    setup: Callable[[Path, Path], List[str]]
    code: int
    messages: List[str] = field(default_factory=list)
    checkpoint: bool = True        # add --checkpoint SMALL_PTH unless the case sets its own
    database_written: Optional[bool] = None  # if set: whether DB exists afterwards


# ---- setups: (tmp, small_pth) -> argv after the program name -------------------------------------

def _missing_folder(tmp, ckpt):
    return [tmp / "nope", tmp / "out" / "db.db"]


def _empty_folder(tmp, ckpt):
    (tmp / "images").mkdir()
    (tmp / "images" / "notes.txt").write_text("not an image")
    return [tmp / "images", tmp / "out" / "db.db"]


def _bad_files_only(tmp, ckpt):
    folder = tmp / "images"
    folder.mkdir()
    shutil.copy(JPEG_A, folder / "good.jpg")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(JPEG_B.read_bytes()[:2000])
    (folder / "text.jpg").write_text("hello, I am not a JPEG")
    return [folder, tmp / "out" / "db.db"]


def _truncated_strict(tmp, ckpt):
    folder = _two_images(tmp / "images")
    (folder / "truncated.jpg").write_bytes(JPEG_B.read_bytes()[:2000])
    return [folder, tmp / "out" / "db.db", "--strict"]


def _huge_strict(tmp, ckpt):
    # above the project's pixel limit (lowered for the test by the `small_pixel_limit` row flag)
    folder = _two_images(tmp / "images")
    Image.new("RGB", (3000, 2000), (90, 120, 150)).save(folder / "huge.png")
    return [folder, tmp / "out" / "db.db", "--strict"]


def _checkpoint_file(content: bytes):
    def setup(tmp, ckpt):
        folder = _two_images(tmp / "images")
        (tmp / "model.pth").write_bytes(content)
        return [folder, tmp / "out" / "db.db", "--checkpoint", tmp / "model.pth"]
    return setup


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _truncated_checkpoint(tmp, ckpt):
    folder = _two_images(tmp / "images")
    (tmp / "model.pth").write_bytes(Path(ckpt).read_bytes()[:5000])
    return [folder, tmp / "out" / "db.db", "--checkpoint", tmp / "model.pth"]


def _missing_checkpoint(tmp, ckpt):
    folder = _two_images(tmp / "images")
    return [folder, tmp / "out" / "db.db", "--checkpoint", tmp / "missing.pth"]


def _hub_folder_without_config(tmp, ckpt):
    folder = _two_images(tmp / "images")
    (tmp / "hub").mkdir()
    (tmp / "hub" / "model.safetensors").write_bytes(b"\x00" * 16)
    return [folder, tmp / "out" / "db.db", "--checkpoint", tmp / "hub"]


def _database_under_a_file(tmp, ckpt):
    folder = _two_images(tmp / "images")
    (tmp / "file").write_text("a file where a folder should be")
    return [folder, tmp / "file" / "db.db"]


def _output_under_a_file(flag):
    def setup(tmp, ckpt):
        folder = _two_images(tmp / "images")
        (tmp / "file").write_text("a file where a folder should be")
        return [folder, tmp / "out" / "db.db", flag, tmp / "file" / "sub"]
    return setup


def _database_is_a_folder(tmp, ckpt):
    folder = _two_images(tmp / "images")
    (tmp / "out").mkdir()
    return [folder, tmp / "out"]


def _foreign_model_in_output(tmp, ckpt):
    folder = _two_images(tmp / "images")
    (tmp / "sparse").mkdir()
    (tmp / "sparse" / "cameras.bin").write_bytes(b"the user's own model")
    return [folder, tmp / "out" / "db.db", "--output", tmp / "sparse"]


def _missing_pair_names(tmp, ckpt):
    folder = _two_images(tmp / "images")
    (tmp / "pairs.txt").write_text("a.jpg b.jpg\na.jpg ghost.jpg\n")
    return [folder, tmp / "out" / "db.db", "--pairs", tmp / "pairs.txt"]


def _flag(*extra):
    def setup(tmp, ckpt):
        return [_two_images(tmp / "images"), tmp / "out" / "db.db", *extra]
    return setup


def _spaces_with_h5(tmp, ckpt):
    folder = tmp / "images"
    folder.mkdir()
    shutil.copy(JPEG_A, folder / "my photo.jpg")
    shutil.copy(JPEG_B, folder / "b.jpg")
    return [folder, tmp / "out" / "db.db", "--export-h5", tmp / "h5"]


def _not_utf8_name(tmp, ckpt):
    folder = _two_images(tmp / "images")
    shutil.copy(JPEG_A, os.fsencode(folder) + b"/caf\xe9.jpg")
    return [folder, tmp / "out" / "db.db", "--strict"]


# ---- valid but unusual inputs: the run goes through ------------------------------------------------

def _valid(make_image: Callable[[Path], None]):
    def setup(tmp, ckpt):
        folder = tmp / "images"
        folder.mkdir()
        shutil.copy(JPEG_A, folder / "a.jpg")
        make_image(folder)
        return [folder, tmp / "out" / "db.db", "--mapper", "none"]
    return setup


def _cmyk(folder):
    Image.open(JPEG_B).convert("CMYK").save(folder / "cmyk.jpg")


def _grey16(folder):
    grey = np.asarray(Image.open(JPEG_B).convert("L"), np.uint16) * 200  # spans 0..51000
    Image.fromarray(grey).save(folder / "grey16.png")


def _grey(folder):
    Image.open(JPEG_B).convert("L").save(folder / "grey.png")


def _exif_rotated(folder):
    shutil.copy(DATA / "images" / "portrait_exif6_600x900.jpg", folder / "rotated.jpg")


def _same_names_in_subfolders(folder):
    for sub in ("x", "y"):
        (folder / sub).mkdir()
    shutil.copy(JPEG_B, folder / "x" / "img.jpg")
    shutil.copy(JPEG_A, folder / "y" / "img.jpg")


def _unicode_name(folder):
    shutil.copy(JPEG_B, folder / "Sacré-Cœur ünï.jpg")


def _spaces_name(folder):
    (folder / "sub dir").mkdir()
    shutil.copy(JPEG_B, folder / "sub dir" / "my photo.jpg")


CASES = {
    # missing / empty / unreadable inputs
    "missing folder": Case(_missing_folder, 2, ["does not exist"], database_written=False),
    "empty folder": Case(_empty_folder, 2, ["no images found"], database_written=False),
    "zero-byte, truncated and text-as-jpg files": Case(
        _bad_files_only, 2, ["zero.jpg", "truncated.jpg", "text.jpg", "at least 2 readable images"],
        database_written=False),
    "truncated jpg with --strict": Case(_truncated_strict, 2, ["truncated.jpg"], database_written=False),
    "huge photo with --strict": Case(_huge_strict, 2, ["huge.png", "too large"], database_written=False),
    "name that is not UTF-8": Case(_not_utf8_name, 2, ["UTF-8"], database_written=False),
    "name with a space and --export-h5": Case(_spaces_with_h5, 2, ["my photo.jpg", "whitespace"],
                                              database_written=False),
    # checkpoints
    "missing checkpoint": Case(_missing_checkpoint, 2, ["missing.pth", "not found"], checkpoint=False,
                               database_written=False),
    "random-bytes checkpoint": Case(_checkpoint_file(bytes(range(256)) * 8), 2, ["model.pth"],
                                    checkpoint=False, database_written=False),
    "truncated checkpoint": Case(_truncated_checkpoint, 2, ["model.pth"], checkpoint=False,
                                 database_written=False),
    "malicious checkpoint": Case(_checkpoint_file(pickle.dumps({"model": _Evil()})), 2, ["model.pth"],
                                 checkpoint=False, database_written=False),
    "offline, no --checkpoint": Case(_flag(), 2, ["HF_HUB_OFFLINE", "--checkpoint", "mast3r_colmap.testing.weights"],
                                     checkpoint=False, database_written=False),
    "hub folder without config": Case(_hub_folder_without_config, 2, ["config.json"], checkpoint=False,
                                      database_written=False),
    # outputs
    "database under a file": Case(_database_under_a_file, 2, ["not writable"]),
    "--output under a file": Case(_output_under_a_file("--output"), 2, ["not writable"], database_written=False),
    "--export-h5 under a file": Case(_output_under_a_file("--export-h5"), 2, ["not writable"],
                                     database_written=False),
    "database is a folder": Case(_database_is_a_folder, 2, ["is a folder"]),
    "a model we did not write in --output": Case(_foreign_model_in_output, 2, ["cameras.bin"],
                                                 database_written=False),
    # pairs and flags
    "pairs file naming a missing image": Case(_missing_pair_names, 2, ["ghost.jpg"], database_written=False),
    "bad pairs spec": Case(_flag("--pairs", "sequential:0"), 2, ["sequential:0"], database_written=False),
    "--num-workers -1": Case(_flag("--num-workers", "-1"), 2, ["num_workers"], database_written=False),
    "--cache-size 0": Case(_flag("--cache-size", "0"), 2, ["cache_size"], database_written=False),
    "--batch-size 0": Case(_flag("--batch-size", "0"), 2, ["batch_size"], database_written=False),
    "--max-kps -5": Case(_flag("--max-kps", "-5"), 2, ["max_kps"], database_written=False),
    "--cell-size 0": Case(_flag("--cell-size", "0"), 2, ["cell_size"], database_written=False),
    "--seed abc": Case(_flag("--seed", "abc"), 2, ["--seed", "invalid int value"], database_written=False),
    "--device cuda without CUDA": Case(_flag("--device", "cuda"), 2, ["cuda", "not available"],
                                       database_written=False),
    # valid inputs that must go through
    "CMYK jpg": Case(_valid(_cmyk), 0, database_written=True),
    "16-bit grey png": Case(_valid(_grey16), 0, database_written=True),
    "8-bit grey png": Case(_valid(_grey), 0, database_written=True),
    "EXIF-rotated jpg": Case(_valid(_exif_rotated), 0, database_written=True),
    "same file name in two subfolders": Case(_valid(_same_names_in_subfolders), 0, database_written=True),
    "unicode name": Case(_valid(_unicode_name), 0, database_written=True),
    "spaces in names": Case(_valid(_spaces_name), 0, database_written=True),
}


def _run_cli(argv, caplog, capsys) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        try:
            code = main([str(a) if not isinstance(a, bytes) else os.fsdecode(a) for a in argv] + ["--no-progress"])
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, caplog.text + capsys.readouterr().err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, small_pth, caplog, capsys, monkeypatch, request):
    case = CASES[name]
    if name == "huge photo with --strict":
        monkeypatch.setattr("mast3r_colmap.images.MAX_IMAGE_PIXELS", 2_000_000)
    if name == "offline, no --checkpoint":
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path.parent / f"{tmp_path.name}-hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if name == "--device cuda without CUDA":
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    if case.code == 0:
        # the rows are about reading odd pictures and names, done before any resizing: the runs that go through
        # match at 256 px
        request.getfixturevalue("presets_at_256")
    monkeypatch.chdir(tmp_path)  # a malicious pickle would write PWNED here
    argv = case.setup(tmp_path, small_pth)
    if case.checkpoint:
        argv += ["--checkpoint", small_pth]
    before = _snapshot(tmp_path)
    before_paths = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")]
    code, log = _run_cli(argv, caplog, capsys)
    assert code == case.code, f"{name}: exit {code}, log:\n{log[-3000:]}"
    for fragment in case.messages:
        assert fragment in log, f"{name}: {fragment!r} not in the log:\n{log[-3000:]}"
    if case.code != 0:
        assert "Traceback" not in log
        left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
        assert left == sorted(before_paths), f"{name}: a failed run left new files or folders behind"
    after = _snapshot(tmp_path)
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"{name}: existing files changed or removed: {changed}"
    assert not (tmp_path / "PWNED").exists()
    db = Path(argv[1])
    if case.database_written is not None:
        assert db.is_file() == case.database_written, name
    if case.code == 0:
        names = sorted(str(p.relative_to(argv[0])).replace(os.sep, "/") for p in Path(argv[0]).rglob("*")
                       if p.is_file())
        with pycolmap.Database.open(str(db)) as d:
            images = {img.name: img for img in d.read_all_images()}
            assert sorted(images) == names
            for img in images.values():  # every image has its keypoints and a camera of its stored size
                assert d.exists_keypoints(img.image_id)
            assert d.num_matched_image_pairs() == len(names) * (len(names) - 1) // 2


_HOLDER = textwrap.dedent("""
    import sys, time
    from mast3r_colmap.lock import database_lock
    with database_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_concurrent_run_stops_at_once(tmp_path, small_pth, caplog, capsys, presets_at_256):
    """A second run on a database in use stops before loading anything, naming the holder."""
    argv = [_two_images(tmp_path / "images"), tmp_path / "db.db", "--checkpoint", small_pth]
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "db.db")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(tmp_path)
        start = time.monotonic()
        code, log = _run_cli(argv, caplog, capsys)
        assert code == EXIT_BAD_INPUT
        assert f"is in use by process {holder.pid}" in log
        assert time.monotonic() - start < 10
        assert _snapshot(tmp_path) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died (kill -9): its lock is stale and the run goes through
    code, log = _run_cli(argv + ["--mapper", "none"], caplog, capsys)
    assert code == 0, log[-3000:]
