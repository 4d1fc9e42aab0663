"""The installed environment: Pillow and pycolmap live together in one process.

pycolmap >= 4.1 exports a static zlib; imported before Pillow, it makes Pillow's PNG writer abort the
process. Each case runs in a fresh interpreter, since the import order of this test process is fixed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)  # a clash may hang in the crash handler


@pytest.mark.parametrize("imports", [
    "import mast3r_colmap\nimport pycolmap",
    "import mast3r_colmap.export.colmap_db\nimport pycolmap",  # our modules import pycolmap themselves
    "from mast3r_colmap.testing.synthetic import SyntheticScene\nimport pycolmap",
])
def test_png_written_after_package_and_pycolmap(tmp_path, imports):
    out = _python(imports + """
from PIL import Image
import numpy as np
pixels = (np.arange(64 * 48 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
Image.fromarray(pixels).save("out.png")
print("saved")
""", tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "saved"
    expected = (np.arange(64 * 48 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), expected)


def test_synthetic_scene_writes_pngs_after_pycolmap(tmp_path):
    """The code path of the end-to-end tests: scene images written with pycolmap in the process."""
    out = _python("""
import mast3r_colmap
import pycolmap
from mast3r_colmap.testing.synthetic import SyntheticScene
scene = SyntheticScene.make(num_cameras=2, image_size=(64, 48), seed=0, kind="planes")
scene.write_images("images")
db = pycolmap.Database.open("db.db"); db.close()
print("ok")
""", tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert len(files) == 2 and all(Image.open(tmp_path / "images" / f).size == (64, 48) for f in files)


def test_wrong_import_order_is_reported(tmp_path):
    out = _python("import pycolmap\nimport mast3r_colmap\n", tmp_path)
    assert out.returncode == 0
    assert "RuntimeWarning" in out.stderr and "Import mast3r_colmap (or PIL.Image) before pycolmap" in out.stderr


def test_no_warning_in_the_right_order(tmp_path):
    out = _python("import mast3r_colmap\nimport pycolmap\nimport mast3r_colmap.pipeline\n", tmp_path)
    assert out.returncode == 0 and out.stderr == ""
