"""Former name of :mod:`mast3r_colmap.localization`: ``python -m mast3r_colmap.localize`` runs its command
line, and its public names are importable from here."""

import sys

from .localization import *  # noqa: F401,F403 (re-exported)
from .localization import __all__  # noqa: F401
from .localization.cli import main

if __name__ == "__main__":
    sys.exit(main())
