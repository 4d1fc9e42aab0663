"""``python -m pipelines.aachen ...``: runs :mod:`mast3r_colmap.pipelines.aachen` (the pipeline lives in the
installed package; this file keeps the repository's ``pipelines/`` entry point)."""

import sys

from mast3r_colmap.pipelines.aachen import main

if __name__ == "__main__":
    sys.exit(main())
