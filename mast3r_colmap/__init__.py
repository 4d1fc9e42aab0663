"""mast3r-colmap: MASt3R dense matching as a COLMAP / pycolmap / hloc feature-matching plugin."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
