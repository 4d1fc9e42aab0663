"""``python -m mast3r_colmap IMAGES DATABASE [options]``: the same as ``python -m mast3r_colmap.run``."""

import sys

from .run import main

sys.exit(main())
