"""The command line: bad input gets a clear message and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import SACRE_COEUR, run_main as _run
from mast3r_colmap.pipeline import usable_images
from mast3r_colmap.images import ImageLoadError
from mast3r_colmap.run import EXIT_BAD_INPUT



def test_help(capsys):
    """In process (``python -m mast3r_colmap.run`` itself runs in tests/test_exit_codes.py)."""
    from mast3r_colmap.run import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--pairs", "--checkpoint", "--device", "--preset", "--camera-mode", "--export-h5", "--mapper",
                 "--output", "--strict", "--batch-size", "--cache-size", "--num-workers"):
        assert flag in out


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


# ---- the command-line layer shared by every entry point (mast3r_colmap.cli) ----------------------------------

MODEL_FLAGS = ("--checkpoint", "--device", "--precision")
MATCHER_FLAGS = ("--batch-size", "--cache-size", "--num-workers")
LOGGING_FLAGS = ("-v", "--verbose", "-q", "--quiet", "--log-level", "--no-progress")


def _parsers():
    from mast3r_colmap import evaluate, export_3dgs, hloc, run, visualize
    from mast3r_colmap.localization import cli as localization_cli
    from mast3r_colmap.pipelines import aachen

    parsers = {"run": (run.build_parser(), True), "localization": (localization_cli.build_parser(), True),
               "aachen": (aachen.build_parser(), True), "hloc": (hloc.build_parser(), True),
               "evaluate": (evaluate.build_parser(), False), "export_3dgs": (export_3dgs.build_parser(), False)}
    sub = next(a for a in visualize.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == ["matches", "model"]
    parsers.update({f"visualize {name}": (p, False) for name, p in sub.choices.items()})
    return parsers


def test_every_entry_point_shares_the_argument_groups():
    for name, (parser, loads_model) in _parsers().items():
        flags = {s for action in parser._actions for s in action.option_strings}
        expected = set(LOGGING_FLAGS) | (set(MODEL_FLAGS + MATCHER_FLAGS) if loads_model else set())
        assert expected <= flags, (name, expected - flags)
        if not loads_model:
            assert not flags & set(MODEL_FLAGS), name
        assert "exit codes:" in parser.format_help() and "interrupted" in parser.format_help(), name


@pytest.mark.parametrize("argv, level", [([], "INFO"), (["-v"], "DEBUG"), (["--verbose"], "DEBUG"),
                                          (["-q"], "WARNING"), (["--log-level", "error"], "ERROR")])
def test_log_level_flags(argv, level):
    from mast3r_colmap.evaluate import build_parser

    args = build_parser().parse_args(["results.txt", "gt.txt", *argv])
    assert args.log_level == level and args.no_progress is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["results.txt", "gt.txt", "-v", "-q"])  # one level at a time


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", "bfloat16"), ("fp16", "float16")])
def test_load_network_maps_device_and_precision(monkeypatch, precision, dtype):
    import torch

    import mast3r_colmap.model.checkpoint as checkpoint
    from mast3r_colmap import cli
    from mast3r_colmap.localization import cli as localization_cli

    calls = []
    monkeypatch.setattr(checkpoint, "load_model", lambda source, device=None, amp_dtype=None: calls.append(
        (source, device, amp_dtype)) or "network")
    args = localization_cli.build_parser().parse_args(
        ["--images", "i", "--reference", "r", "--database", "d", "--pairs", "p", "--output", "o",
         "--checkpoint", "weights.pth", "--device", "cpu", "--precision", precision])
    assert cli.load_network(args) == "network"
    assert calls == [("weights.pth", torch.device("cpu"), None if dtype is None else getattr(torch, dtype))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args.device = "cuda"
    with pytest.raises(ValueError, match="device 'cuda' is not available"):
        cli.load_network(args)
    assert len(calls) == 1  # the device is checked before anything is loaded


def test_run_cli_policy(caplog):
    from mast3r_colmap.cli import EXIT_INTERRUPTED, run_cli
    from mast3r_colmap.model.checkpoint import CheckpointError

    def raising(exc):
        def body(_):
            raise exc
        return body

    with caplog.at_level(logging.INFO):
        assert run_cli(raising(CheckpointError("checkpoint 'x.pth' not found")), None) == EXIT_BAD_INPUT
        assert run_cli(raising(FileNotFoundError("no such file: y")), None) == EXIT_BAD_INPUT
        assert run_cli(raising(KeyboardInterrupt()), None, "run it again") == EXIT_INTERRUPTED == 130
        assert run_cli(lambda _: 0, None) == 0
    assert "checkpoint 'x.pth' not found" in caplog.text and "no such file: y" in caplog.text
    assert "interrupted; run it again" in caplog.text and "Traceback" not in caplog.text
    with pytest.raises(RuntimeError, match="a bug"):              # a bug is not bad input: it surfaces
        run_cli(raising(RuntimeError("a bug")), None)


def test_cli_layer_imports_no_model():
    code = ("import sys, mast3r_colmap.cli; "
            "assert 'torch' not in sys.modules and 'mast3r_colmap.model' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _poses_file(path: Path, names) -> Path:
    path.write_text("".join(f"{n} 1 0 0 0 0 0 0\n" for n in names))
    return path


def _run_at_once(commands) -> list:
    """``subprocess.run(command, capture_output=True, text=True)`` of independent commands, all at once (their
    time is mostly imports)."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    done = []
    for p in procs:
        stdout, stderr = p.communicate()
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def test_evaluate_logging_and_bad_input(tmp_path):
    """The same policy as the other tools: one message and exit 2, the traceback only with -v; -q and
    --log-level filter the log."""
    gt = _poses_file(tmp_path / "gt.txt", ["a.jpg", "b.jpg"])
    res = _poses_file(tmp_path / "res.txt", ["a.jpg"])
    cmd = [sys.executable, "-m", "mast3r_colmap.evaluate"]
    missing, verbose, ok, quiet = _run_at_once([cmd + [str(tmp_path / "missing.txt"), str(gt)],
                                                cmd + [str(tmp_path / "missing.txt"), str(gt), "-v"],
                                                cmd + [str(res), str(gt)],
                                                cmd + [str(res), str(gt), "--log-level", "ERROR"]])
    assert missing.returncode == EXIT_BAD_INPUT and "missing.txt" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert verbose.returncode == EXIT_BAD_INPUT and "Traceback" in verbose.stderr
    assert ok.returncode == 0 and "1 of 2 ground-truth queries have no result" in ok.stderr
    assert "2 queries (1 missing)" in ok.stdout
    assert quiet.returncode == 0 and "no result" not in quiet.stderr and "2 queries (1 missing)" in quiet.stdout
