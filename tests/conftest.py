"""Shared fixtures: the golden vectors, test checkpoints and tolerance checks."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import mast3r_colmap  # noqa: F401  (first: it loads Pillow before any test imports pycolmap)
import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
#: hloc's own source (Apache-2.0, unchanged), test data beside the repository: never copied into it.
HLOC_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "third_party" / "hloc"

# Tolerances of the golden vectors (vectors README §7), in float32.
DESC_ABS = 5e-6
CONF_REL = 2e-5
PTS3D_OF_MAX = 3e-5


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out - ref| / max(|ref|, 5 % of max |ref|), as defined by the vectors README."""
    ref = np.asarray(ref, np.float64)
    denom = np.maximum(np.abs(ref), 0.05 * np.abs(ref).max())
    return float((np.abs(np.asarray(out, np.float64) - ref) / denom).max())


def assert_output_close(name: str, out, ref) -> None:
    """Compare one model output with its reference using the tolerance of its kind."""
    out = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    ref = np.asarray(ref)
    assert out.shape == ref.shape, f"{name}: shape {out.shape} != {ref.shape}"
    assert np.isfinite(out).all(), f"{name}: non-finite values"
    if "pts3d" in name:
        err = np.abs(out - ref).max() / np.abs(ref).max()
        assert err <= PTS3D_OF_MAX, f"{name}: max error {err:.2e} of max|ref| > {PTS3D_OF_MAX}"
    elif "desc_conf" in name or name.endswith("conf"):
        err = relative_error(out, ref)
        assert err <= CONF_REL, f"{name}: relative error {err:.2e} > {CONF_REL}"
    elif "desc" in name:
        err = np.abs(out - ref).max()
        assert err <= DESC_ABS, f"{name}: max abs error {err:.2e} > {DESC_ABS}"
    else:
        raise KeyError(name)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def vectors():
    """Lazy access to the golden vector files: vectors('model_small')."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = np.load(DATA / f"{name}.npz")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def small_model():
    """The small configuration with the seed-1 test weights of the golden vectors."""
    from mast3r_colmap.model import MASt3R
    from mast3r_colmap.model.checkpoint import match_state_dict
    from mast3r_colmap.testing.weights import make_state_dict

    with torch.device("meta"):  # as load_model: no random initialisation to overwrite
        model = MASt3R("small")
    model.load_state_dict(match_state_dict(model, make_state_dict("small", 1)), strict=True, assign=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def small_pth(tmp_path_factory) -> Path:
    """An official-format .pth of the small seed-1 test weights."""
    from mast3r_colmap.testing.weights import write_official_pth

    path = tmp_path_factory.mktemp("ckpt") / "small_seed1.pth"
    write_official_pth(str(path), "small", 1)
    return path


@pytest.fixture(scope="session")
def small_hub_dir(tmp_path_factory) -> Path:
    """A hub-format folder of the small seed-1 test weights."""
    from mast3r_colmap.testing.weights import write_hub_dir

    path = tmp_path_factory.mktemp("hub") / "small_seed1"
    write_hub_dir(str(path), "small", 1)
    return path


@pytest.fixture(scope="session")
def hloc():
    """The real hloc package from ``../shared/third_party/hloc`` (its readers and pipelines run against our
    files). Absent folder: skipped outside CI, an error in CI."""
    if not (HLOC_ROOT / "hloc" / "__init__.py").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"hloc's source is missing at {HLOC_ROOT} (CI must have ../shared beside the clone)")
        pytest.skip(f"hloc's source is not at {HLOC_ROOT}")
    if str(HLOC_ROOT) not in sys.path:
        sys.path.insert(0, str(HLOC_ROOT))
    import hloc as module

    return module

SACRE_COEUR = DATA / "sacre_coeur" / "mapping"


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder with two photos of the bundled Sacre-Coeur set."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("03903474_1471484089.jpg", "10265353_3838484249.jpg"):
        shutil.copy(SACRE_COEUR / name, folder / name)
    return folder


@pytest.fixture
def presets_at_256(monkeypatch):
    """The matcher presets at 256 px instead of 512, patched in their table (the command line has no image-size
    flag): for runs to which the network's input size is incidental, a quarter of the pixels to encode and match."""
    from mast3r_colmap.matching import matcher as matcher_module

    for preset, fields in list(matcher_module.confs.items()):
        monkeypatch.setitem(matcher_module.confs, preset, {**fields, "image_size": 256})


def run_main(argv, caplog, focal_prior: bool = False) -> tuple[int, str]:
    """``mast3r_colmap.run.main(argv + ["--no-progress"])`` in process: (exit code, log text).

    Without ``focal_prior`` the run gets ``--no-focal-prior``: the focal pass of the random test weights costs
    a full-head decode per image and tells these tests nothing (tests/test_focal.py covers it).
    """
    from mast3r_colmap.run import main

    caplog.clear()
    extra = ["--no-progress"] + ([] if focal_prior else ["--no-focal-prior"])
    with caplog.at_level(logging.INFO):
        code = main([str(a) for a in argv] + extra)
    return code, caplog.text
