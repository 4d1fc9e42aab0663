"""Exit codes of the run command line: bad devices are bad input (2) caught before loading, a run without
a model exits with 3 and says why, and COLMAP writes no files into the temp folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import run_main as _run
from mast3r_colmap.run import EXIT_BAD_INPUT, EXIT_NO_MODEL

GLOG_LINE = re.compile(r"^[IWEF]\d{8} ", re.MULTILINE)



def test_exit_code_values() -> None:
    assert (EXIT_BAD_INPUT, EXIT_NO_MODEL) == (2, 3)


def test_help_lists_exit_codes(capsys, monkeypatch) -> None:
    from mast3r_colmap.run import main

    monkeypatch.setenv("COLUMNS", "80")  # argparse's width, as in a pipe (python -m mast3r_colmap.run: test below)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert re.search(r"^exit codes:\n  0 +success\n  2 +bad input", out, re.MULTILINE)
    assert re.search(r"^  3 +no model: the mapper registered fewer than 2 images", out, re.MULTILINE)


@pytest.mark.parametrize("device, message", [
    ("cuda", "device 'cuda' is not available"),
    ("cuda:0", "device 'cuda:0' is not available"),
    ("gpu0", "unknown device 'gpu0'"),
])
def test_unavailable_device_is_bad_input(images, tmp_path, caplog, monkeypatch, device, message) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # the checkpoint does not exist: the device error must come first (nothing is loaded)
    code, log = _run([images, tmp_path / "db.db", "--device", device, "--checkpoint", tmp_path / "none.pth"],
                     caplog)
    assert code == EXIT_BAD_INPUT and message in log and "none.pth" not in log and "Traceback" not in log
    assert not (tmp_path / "db.db").exists()


def test_missing_gpu_index_is_bad_input(images, tmp_path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, log = _run([images, tmp_path / "db.db", "--device", "cuda:1", "--checkpoint", tmp_path / "none.pth"],
                     caplog)
    assert code == EXIT_BAD_INPUT and "device 'cuda:1' does not exist: this machine has 1 cuda device(s)" in log


def test_foreign_model_in_output_fails_before_matching(images, tmp_path, caplog, small_pth) -> None:
    out = tmp_path / "sparse"
    out.mkdir()
    (out / "cameras.bin").write_bytes(b"someone else's model")
    code, log = _run([images, tmp_path / "db.db", "--checkpoint", small_pth], caplog)   # default --output
    assert code == EXIT_BAD_INPUT and "not written by mast3r-colmap" in log and "cameras.bin" in log
    assert not (tmp_path / "db.db").exists() and (out / "cameras.bin").read_bytes() == b"someone else's model"
    # no mapping: the folder is not checked (the run goes on to the missing checkpoint)
    code, log = _run([images, tmp_path / "db.db", "--checkpoint", tmp_path / "none.pth", "--mapper", "none"], caplog)
    assert code == EXIT_BAD_INPUT and "none.pth" in log and "not written by" not in log


def test_no_model_exits_3_and_leaves_no_temp_files(images, tmp_path, small_pth) -> None:
    """The untrained test weights give a verified pair but far too few inliers for an initial pair."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    # --no-focal-prior: the focal pass of the random test weights (a full-head decode per image) has nothing to do
    # with the mapper's outcome or COLMAP's files (as conftest.run_main)
    proc = subprocess.run([sys.executable, "-m", "mast3r_colmap.run", str(images), str(tmp_path / "db.db"),
                           "--checkpoint", str(small_pth), "--no-progress", "--no-focal-prior"],
                          env=dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_NO_MODEL, proc.stderr
    assert json.loads(proc.stdout) == {"num_images": 2, "num_pairs": 1, "num_verified_pairs": 1,
                                       "num_registered_images": 0}
    assert ("ERROR mast3r_colmap: no model: the incremental mapper registered 0 images (at least 2 needed); "
            "1 of 1 image pairs passed geometric verification") in proc.stderr
    assert "WARNING mast3r_colmap.colmap: Failed to create any sparse model" in proc.stderr
    assert not GLOG_LINE.search(proc.stderr), proc.stderr                 # no raw COLMAP lines
    assert os.listdir(tmp) == []                                           # no glog files in the temp folder
    summary = json.loads((tmp_path / "sparse" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["previous"] is None
