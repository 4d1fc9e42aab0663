"""``python -m mast3r_colmap.localization ...``: see :mod:`mast3r_colmap.localization.cli`."""

import sys

from .cli import main

sys.exit(main())
