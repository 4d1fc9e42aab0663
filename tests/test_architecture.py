"""The stages import one way only: each module of the package may import only the stages below it.

Every ``import`` and ``from ... import`` of the package (at module level and inside functions) is read
with ``ast``; a new import that runs back up the stages fails here, naming the file and the line.
See docs/architecture.md for the stages.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mast3r_colmap"

_BASE = {"__init__", "structures", "utils", "options", "lock"}
#: top-level module or subpackage -> what it may import from the package (besides itself)
ALLOWED: dict[str, set[str]] = {
    "__init__": None,  # the public API re-exports every stage (lazily)
    "structures": set(),
    "utils": set(),
    "options": set(),
    "lock": set(),
    "report": _BASE,  # the run report: plain values, no torch or pycolmap import at module level
    "images": _BASE,
    "cameras": _BASE,
    "focal": _BASE,  # numpy only: the focal length of a pointmap
    "store": _BASE,
    "keypoints": _BASE,
    "shards": _BASE | {"store", "matching"},  # cutting the pairs into shards; the shard stores beside the run's store
    "model": _BASE,
    "matching": _BASE | {"images", "model", "focal"},
    "pairs": _BASE,
    "retrieval": _BASE | {"images", "model"},
    "export": _BASE | {"cameras"},
    "verification": _BASE | {"export"},
    "mapping": _BASE | {"export"},
    "export_3dgs": _BASE | {"mapping", "cli"},  # the model undistorted for Gaussian Splatting, and its command line
    "pipeline": _BASE | {"images", "cameras", "store", "keypoints", "matching", "pairs", "export", "verification",
                         "mapping", "report", "export_3dgs", "shards"},
    # who matches the shards (this process, torchrun's ranks, Ray tasks), merged by the pipeline
    "executors": _BASE | {"store", "matching", "shards", "pipeline"},
    "localization": _BASE | {"images", "cameras", "store", "keypoints", "matching", "pairs", "export",
                             "verification", "mapping", "pipeline", "cli"},
    "hloc": _BASE | {"images", "store", "keypoints", "matching", "pairs", "export", "pipeline", "cli"},
    "evaluate": _BASE | {"cli"},
    # pictures of matches and models, and their command line (the image folder from a run's report)
    "visualize": _BASE | {"export", "mapping", "cli", "report"},
    # the command lines: argument parsing and wiring, on top of everything
    "cli": _BASE | {"model", "matching"},
    "run": None,
    "localize": None,
    "pipelines": None,
    "__main__": None,
    # test stand-ins: anything but the command lines
    "testing": _BASE | {"images", "cameras", "store", "keypoints", "model", "matching", "pairs", "retrieval",
                        "export", "verification", "mapping"},
}


def _imports(source: str, rel: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, top-level module of the package) of every package import in the ``source`` of the file
    ``mast3r_colmap/<rel>.py``."""
    package = list(rel[:-1])  # the package the file is in, relative to mast3r_colmap
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                names = [target[0]] if target else [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "mast3r_colmap":
                target = node.module.split(".")[1:]
                names = [target[0]] if target else [a.name for a in node.names]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("mast3r_colmap.")]
        else:
            continue
        out.extend((node.lineno, "__init__" if n == "__version__" else n) for n in names)
    return out


def test_every_module_is_in_the_table():
    tops = {p.relative_to(PACKAGE).with_suffix("").parts[0] for p in PACKAGE.rglob("*.py")}
    assert tops <= set(ALLOWED), f"new top-level modules need a row in ALLOWED: {sorted(tops - set(ALLOWED))}"


def test_imports_run_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        top = path.relative_to(PACKAGE).with_suffix("").parts[0]
        allowed = ALLOWED[top]
        if allowed is None:
            continue
        for line, target in _imports(path.read_text(encoding="utf-8"), path.relative_to(PACKAGE).with_suffix("").parts):
            if target != top and target not in allowed:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "imports that run back up the stages:\n" + "\n".join(wrong)


def test_the_checker_sees_every_form_of_import():
    # function-level imports too: a detector that only read module-level imports would let `utils`
    # import the model lazily
    source = ("from . import mapping\nfrom .. import pairs\n"
              "def f():\n    from .model import MASt3R\n    import mast3r_colmap.pairs.files\n"
              "    from mast3r_colmap import store\n    from .frm import x\n")
    assert _imports(source, ("matching", "matcher")) == [(1, "matching"), (2, "pairs"), (4, "matching"),
                                                         (5, "pairs"), (6, "store"), (7, "matching")]
    assert _imports("from .model import MASt3R\n", ("utils",)) == [(1, "model")]


def test_public_api():
    import subprocess
    import sys

    import mast3r_colmap

    for name in mast3r_colmap.__all__:
        assert getattr(mast3r_colmap, name) is not None, name
    from mast3r_colmap.matching.matcher import Matcher
    from mast3r_colmap.pipeline import reconstruct

    assert mast3r_colmap.Matcher is Matcher and mast3r_colmap.reconstruct is reconstruct
    # importing the package alone loads neither torch nor pycolmap (fast command-line start)
    out = subprocess.run([sys.executable, "-c", "import sys, mast3r_colmap; "
                          "print(sorted({'torch', 'pycolmap'} & set(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
