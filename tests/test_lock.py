"""One run per database: a second run stops at once with the holder's PID, a killed holder's lock is taken
over, and a run leaves nothing behind beside the database, whether it ends well or not."""

from __future__ import annotations

import mast3r_colmap  # noqa: F401  (first: Pillow before pycolmap, see mast3r_colmap/__init__.py)

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pycolmap
import pytest
from PIL import Image

from mast3r_colmap import lock
from mast3r_colmap.lock import database_lock, lock_path, locks_database
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.pipeline import PipelineConfig, reconstruct
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene
from mast3r_colmap.cli import EXIT_BAD_INPUT

_HOLDER = textwrap.dedent("""
    import sys, time
    from mast3r_colmap.lock import database_lock
    with database_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
""")

# A second run through the pipeline and the command lines' error handling; its matcher must never run.
_SECOND_RUN = textwrap.dedent("""
    import sys
    from mast3r_colmap.pipeline import PipelineConfig, reconstruct
    from mast3r_colmap.cli import run_cli, setup_logging

    class MustNotMatch:
        def settings(self):
            return {"source": "none"}

        def match_pairs(self, pairs):
            raise AssertionError("the second run started matching")

    def body(_):
        reconstruct(sys.argv[2], sys.argv[1], MustNotMatch(), PipelineConfig(progress=False, mapper="none"))
        return 0

    setup_logging()
    sys.exit(run_cli(body, None))
""")


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of ``tmp_path / "database.db"``; yields it (killed at the end)."""
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "database.db")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def test_second_run_stops_at_once_with_the_holders_pid(tmp_path, holder):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):                           # without the lock it would go on to match
        Image.new("RGB", (64, 48)).save(images / name)
    script = tmp_path / "second.py"
    script.write_text(_SECOND_RUN)
    start = time.monotonic()
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "database.db"), str(images)],
                         capture_output=True, text=True, timeout=120)   # it would wait 600 s for the lock
    assert out.returncode == EXIT_BAD_INPUT, out.stderr
    assert f"is in use by process {holder.pid};" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - start < 60                      # start-up and imports only
    assert holder.poll() is None
    assert sorted(os.listdir(tmp_path)) == ["database.db.lock", "holder.py", "images", "second.py"]
    assert lock_path(tmp_path / "database.db").read_text().strip() == str(holder.pid)
    with pytest.raises(ValueError, match=f"database .*database.db' is in use by process {holder.pid};"):
        with database_lock(tmp_path / "database.db"):
            pass


def test_lock_of_a_killed_holder_is_taken_over(tmp_path, holder, caplog):
    path = lock_path(tmp_path / "database.db")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert path.read_text().strip() == str(holder.pid)       # the file is left behind, with its PID
    with caplog.at_level(logging.INFO, logger="mast3r_colmap.lock"):
        with database_lock(tmp_path / "database.db") as held:
            assert held == path and path.read_text().strip() == str(os.getpid())
    assert f"left by process {holder.pid}, which has ended" in caplog.text
    assert not path.exists()


def test_reentrant_in_the_holding_thread_only(tmp_path):
    db = tmp_path / "database.db"
    errors = []

    def other_thread():
        try:
            with database_lock(db):
                errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))

    with database_lock(db):
        with database_lock(str(db)):                          # nested: fine, the outer block keeps it
            pass
        assert lock_path(db).read_text().strip() == str(os.getpid())
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert errors == [f"database {str(db)!r} is in use by process {os.getpid()} (this process, another "
                      f"thread); wait for it to finish (lock file {str(lock_path(db))!r})"]
    assert not lock_path(db).exists()
    with database_lock(db):                                   # free again
        pass


def test_release_while_another_opens_the_file(tmp_path, monkeypatch):
    """A run that opened the lock file just before the holder unlinked it must not keep the unlinked inode."""
    db = tmp_path / "database.db"
    path = lock_path(db)
    outer = database_lock(db)
    outer.__enter__()
    real_flock = lock.fcntl.flock
    calls = []

    def flock(fd, operation):
        if not calls:                                         # between our open and our lock: holder leaves
            outer.__exit__(None, None, None)
        calls.append(os.fstat(fd).st_nlink)
        return real_flock(fd, operation)

    monkeypatch.setattr(lock.fcntl, "flock", flock)
    fd = lock._acquire(path, db)
    try:
        assert calls == [0, 1]                                # unlinked: started over on the new file
        assert os.fstat(fd).st_nlink == 1
        assert os.fstat(fd).st_ino == os.stat(path).st_ino
        assert path.read_text().strip() == str(os.getpid())
    finally:
        lock._release(path, fd)
    assert not path.exists()


def test_locks_database_decorator(tmp_path):
    @locks_database("db")
    def write(name, db, flag=False):
        """Doc."""
        assert lock_path(db).exists()
        return name, flag

    assert write("x", tmp_path / "a.db", flag=True) == ("x", True)
    assert write("y", db=tmp_path / "a.db") == ("y", False)
    assert write.__doc__ == "Doc." and not lock_path(tmp_path / "a.db").exists()
    with pytest.raises(TypeError, match="no parameter 'database'"):
        locks_database()(lambda path: None)
    with pytest.raises(ValueError, match="folder .* does not exist"):
        write("z", tmp_path / "missing" / "a.db")


def test_failing_run_leaves_nothing_beside_the_database(tmp_path, monkeypatch):
    """A run that fails in verification leaves only the database and the match store; a re-run finishes."""
    pycolmap.logging.minloglevel = 2
    scene = SyntheticScene.make(num_cameras=4, image_size=(320, 240), seed=1, kind="planes", arc_deg=60)
    scene.write_images(tmp_path / "images")
    matcher = Matcher(SyntheticNetwork(scene), get_config("default", image_size=160), image_dir=tmp_path / "images")
    config = PipelineConfig(pairs="exhaustive", camera_model="PINHOLE", progress=False, mapper="none")
    real = pycolmap.estimate_two_view_geometry
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("verification failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pycolmap, "estimate_two_view_geometry", failing)
    with pytest.raises(RuntimeError, match="verification failed"):
        reconstruct(tmp_path / "images", tmp_path / "database.db", matcher, config)
    assert sorted(os.listdir(tmp_path)) == ["database.db", "database.db.mast3r-matches.sqlite", "images"]
    monkeypatch.setattr(pycolmap, "estimate_two_view_geometry", real)
    result = reconstruct(tmp_path / "images", tmp_path / "database.db", matcher, config)
    assert result["num_verified_pairs"] == 6
    assert sorted(os.listdir(tmp_path)) == ["database.db", "database.db.mast3r-matches.sqlite", "images"]
