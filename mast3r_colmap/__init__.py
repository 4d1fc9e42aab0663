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
