"""The Aachen pipeline's command line (mast3r_colmap.pipelines.aachen): bad input, a missing checkpoint
included, is a message and exit code 2 before anything is written; ``pipelines/aachen.py`` runs it.
The pipeline itself runs in tests/test_localize.py (synthetic stand-in)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mast3r_colmap.cli import EXIT_BAD_INPUT
from mast3r_colmap.pipelines import aachen

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def dataset(tmp_path) -> Path:
    """The files the pipeline checks before loading the network (the model files are not read)."""
    root = tmp_path / "aachen_v1.1"
    (root / "images" / "images_upright" / "db").mkdir(parents=True)
    model = root / "3D-models" / "aachen_v_1_1"
    model.mkdir(parents=True)
    for stem in ("cameras", "images", "points3D"):
        (model / f"{stem}.txt").write_text("")
    (root / "queries").mkdir()
    (root / "queries" / "night_time_queries_with_intrinsics.txt").write_text(
        "query/night/a.jpg SIMPLE_RADIAL 1600 1200 1469.2 800 600 -0.0353\n")
    (root / "pairs-query-netvlad50.txt").write_text("query/night/a.jpg db/1.jpg\n")
    return root


def test_missing_checkpoint_is_bad_input(dataset, tmp_path, caplog):
    outputs = tmp_path / "outputs"
    with caplog.at_level(logging.INFO):
        code = aachen.main(["--dataset", dataset, "--outputs", outputs, "--checkpoint", tmp_path / "missing.pth",
                            "--device", "cpu", "--no-progress"])
    assert code == EXIT_BAD_INPUT
    assert "missing.pth" in caplog.text and "not found" in caplog.text and "Traceback" not in caplog.text
    assert not outputs.exists()  # failed before anything was written


def test_missing_checkpoint_through_the_repository_wrapper(dataset, tmp_path):
    """``python -m pipelines.aachen`` (the repository's entry point): one message, the traceback only with -v."""
    argv = [sys.executable, "-m", "pipelines.aachen", "--dataset", str(dataset), "--outputs", str(tmp_path / "o"),
            "--checkpoint", str(tmp_path / "missing.pth"), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # both commands at once (independent; each process spends its time importing)
    procs = [subprocess.Popen(a, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in (argv, argv + ["-v"])]
    try:
        (_, quiet), (_, verbose) = (p.communicate(timeout=300) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode == EXIT_BAD_INPUT, quiet
    assert "missing.pth" in quiet and "not found" in quiet and "Traceback" not in quiet
    assert procs[1].returncode == EXIT_BAD_INPUT and "Traceback" in verbose, verbose


def test_bad_options_are_bad_input(dataset, tmp_path, caplog, monkeypatch):
    import mast3r_colmap.model.checkpoint as checkpoint

    def never(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(checkpoint, "load_model", never)
    base = ["--dataset", dataset, "--outputs", tmp_path / "out", "--no-progress"]
    for extra, message in ((["--num-loc", "0"], "--num-loc"), (["--batch-size", "0"], "batch_size"),
                           (["--db-pairs", tmp_path / "nope.txt"], "nope.txt"),
                           (["--device", "gpu0"], "unknown device 'gpu0'")):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert aachen.main(base + extra) == EXIT_BAD_INPUT, extra
        assert message in caplog.text and "Traceback" not in caplog.text, (extra, caplog.text)
    with pytest.raises(SystemExit) as exc:                           # argparse
        aachen.main(base + ["--precision", "fp8"])
    assert exc.value.code == EXIT_BAD_INPUT
