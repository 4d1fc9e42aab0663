"""Small helpers shared by the command lines and the text-file readers."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, List, Tuple


def text_records(path: str | os.PathLike) -> Iterator[Tuple[str, List[str]]]:
    """Whitespace-separated fields of each line of a text file, skipping blank lines and ``#`` comments.

    Yields ``(where, fields)`` with ``where`` = ``"path:lineno"`` for error messages.
    """
    with open(path, "r", encoding="utf-8-sig") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if line and not line.startswith("#"):
                yield f"{path}:{lineno}", line.split()


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> None:
    """Create ``folder`` if needed and prove that a file can be written there (root ignores file modes).

    Raises ValueError naming the folder.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"{what} {str(folder)!r} is not writable: {exc.strerror or exc}") from None


def setup_logging(verbose: bool = False) -> None:
    """Logging of the command lines; COLMAP's own INFO lines only when verbose."""
    import pycolmap

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        pycolmap.logging.minloglevel = 1
