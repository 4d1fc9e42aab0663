"""mast3r-colmap: MASt3R dense matching as a COLMAP / pycolmap / hloc feature-matching plugin."""

import logging
import sys
import warnings

# Pillow's C module must be loaded before pycolmap. pycolmap >= 4.1 links zlib statically and exports
# its symbols; when it is loaded first, the system libz that Pillow loads later resolves part of its
# own calls to pycolmap's copy, and saving a PNG then aborts the process ("free(): invalid pointer" in
# deflateEnd). Loading Pillow first binds libz to itself. Every module of this package imports this
# file first, so all of our code paths that write images are safe; a program that imports pycolmap
# itself must import mast3r_colmap (or PIL.Image) before it.
PYCOLMAP_IMPORTED_FIRST = "pycolmap" in sys.modules and "PIL._imaging" not in sys.modules
from PIL import Image as _PILImage  # noqa: E402,F401  (imported for its side effect, see above)

if PYCOLMAP_IMPORTED_FIRST:
    warnings.warn("pycolmap was imported before mast3r_colmap/Pillow: with pycolmap >= 4.1, saving PNG "
                  "files in this process may abort it. Import mast3r_colmap (or PIL.Image) before pycolmap.",
                  RuntimeWarning, stacklevel=2)

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: The public API: ``from mast3r_colmap import load_model, Matcher, reconstruct``. Loaded on first use
#: (PEP 562), so that ``import mast3r_colmap`` stays cheap (no torch) for the command lines.
_API = {
    "load_model": "model.checkpoint",
    "MASt3R": "model",
    "Matcher": "matching.matcher",
    "MatcherConfig": "matching.matcher",
    "get_config": "matching.matcher",
    "match_pair": "matching.matcher",
    "load_image": "images",
    "KeypointConfig": "keypoints",
    "PipelineConfig": "pipeline",
    "reconstruct": "pipeline",
    "export_hloc": "pipeline",
    "pairs_from_spec": "pairs",
    "verify_matches": "verification",
    "LocalizationConfig": "localization",
    "localize": "localization",
    "triangulate_reference": "localization",
    "PairMatches": "structures",
    "ImageKeypoints": "structures",
    "IndexMatches": "structures",
}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
