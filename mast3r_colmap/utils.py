"""Small helpers shared by the command lines and the text-file readers."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple


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


#: Exit code of the command lines for bad input (missing files, unreadable images or checkpoints, ...).
EXIT_BAD_INPUT = 2


def run_cli(run: Callable[[Any], int], args: Any, interrupted_hint: str = "") -> int:
    """Run a command line's body: bad input (ValueError, OSError, checkpoint errors) is logged as one
    message with exit code 2, never a traceback (shown with --verbose); Ctrl-C exits with 130."""
    from .model.checkpoint import CheckpointError

    log = logging.getLogger("mast3r_colmap")
    try:
        return run(args)
    except KeyboardInterrupt:
        log.error("interrupted%s", f"; {interrupted_hint}" if interrupted_hint else "")
        return 130
    except (ValueError, OSError, CheckpointError) as exc:
        log.debug("details", exc_info=True)
        log.error("%s", exc)
        return EXIT_BAD_INPUT
