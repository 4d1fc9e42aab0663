"""The installed environment: Pillow and pycolmap live together in one process.

pycolmap >= 4.1 exports a static zlib; imported before Pillow, it makes Pillow's PNG writer abort the
process. Each case runs in a fresh interpreter, since the import order of this test process is fixed; the
interpreters of all the cases start together (they spend their time importing), each test checks its own.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
from PIL import Image

_WRITE_PNG = """
from PIL import Image
import numpy as np
pixels = (np.arange(64 * 48 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
Image.fromarray(pixels).save("out.png")
print("saved")
"""

PNG_IMPORTS = [
    "import mast3r_colmap\nimport pycolmap",
    "import mast3r_colmap.export.colmap_db\nimport pycolmap",  # our modules import pycolmap themselves
    "from mast3r_colmap.testing.synthetic import SyntheticScene\nimport pycolmap",
]

#: The program of each case, by name.
PROGRAMS: Dict[str, str] = {
    **{f"png{i}": imports + _WRITE_PNG for i, imports in enumerate(PNG_IMPORTS)},
    "scene": """
import mast3r_colmap
import pycolmap
from mast3r_colmap.testing.synthetic import SyntheticScene
scene = SyntheticScene.make(num_cameras=2, image_size=(64, 48), seed=0, kind="planes")
scene.write_images("images")
db = pycolmap.Database.open("db.db"); db.close()
print("ok")
""",
    "wrong_order": "import pycolmap\nimport mast3r_colmap\n",
    "right_order": "import mast3r_colmap\nimport pycolmap\nimport mast3r_colmap.pipeline\n",
}


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> Dict[str, Tuple[Path, subprocess.CompletedProcess]]:
    """(working folder, finished process) of every program, each in a fresh interpreter."""
    started = {}
    for name, code in PROGRAMS.items():
        cwd = tmp_path_factory.mktemp(name)
        started[name] = cwd, subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = {}
    for name, (cwd, proc) in started.items():
        try:
            stdout, stderr = proc.communicate(timeout=120)  # a clash may hang in the crash handler
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += "\n(timed out after 120 s)"
        done[name] = cwd, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return done


@pytest.mark.parametrize("case", range(len(PNG_IMPORTS)), ids=PNG_IMPORTS)
def test_png_written_after_package_and_pycolmap(ran, case):
    cwd, out = ran[f"png{case}"]
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "saved"
    expected = (np.arange(64 * 48 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(cwd / "out.png")), expected)


def test_synthetic_scene_writes_pngs_after_pycolmap(ran):
    """The code path of the end-to-end tests: scene images written with pycolmap in the process."""
    cwd, out = ran["scene"]
    assert out.returncode == 0, out.stderr[-2000:]
    files = sorted(p.name for p in (cwd / "images").iterdir())
    assert len(files) == 2 and all(Image.open(cwd / "images" / f).size == (64, 48) for f in files)


def test_wrong_import_order_is_reported(ran):
    _, out = ran["wrong_order"]
    assert out.returncode == 0
    assert "RuntimeWarning" in out.stderr and "Import mast3r_colmap (or PIL.Image) before pycolmap" in out.stderr


def test_no_warning_in_the_right_order(ran):
    _, out = ran["right_order"]
    assert out.returncode == 0 and out.stderr == ""
