"""Small helpers: text-file records, atomic writes, writable folders, and COLMAP's logging.

The command-line layer (argument groups, exit codes, ``run_cli``) is :mod:`mast3r_colmap.cli`.

COLMAP logging: pycolmap logs through glog, which by default writes hidden log files into the system
temp folder and raw ``E20260101 12:00:00 ... sfm.cc:310] ...`` lines to stderr. Here:

* :func:`configure_colmap_logging` (called by :func:`~.cli.setup_logging`) turns glog's log files off and
  sets ``pycolmap.logging.minloglevel`` from the level of the ``mast3r_colmap.colmap`` logger; what
  COLMAP says outside the block below still goes to stderr in glog's format, filtered by that level.
* :func:`colmap_log_to_python` routes COLMAP's messages into the ``mast3r_colmap.colmap`` logger while a
  block runs (the mappers use it): glog writes into a file in a scratch folder of the caller, which a
  thread follows. pycolmap 4.2.1 has no log callback, so this is the only way short of capturing fd 2.
  Levels go one step down (:data:`COLMAP_LEVELS`): the tool reports the outcome of each stage itself,
  COLMAP's lines are the details (its "Failed to create any sparse model" is a warning here).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
from contextlib import contextmanager
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


def _umask() -> int:
    """The process's umask (read from /proc where it can be, since ``os.umask`` can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_replace(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; moved onto ``path`` with ``os.replace`` when the block
    ends normally (readers see the old file or the new one, never a part), removed otherwise."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode of a plainly created file
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically (:func:`atomic_replace`)."""
    with atomic_replace(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
    return Path(path)


def check_writable(folder: str | os.PathLike, what: str = "output folder", create: bool = True) -> None:
    """Prove that a file can be written in ``folder`` (root ignores file modes), creating it if ``create``.

    With ``create=False`` nothing is created: the nearest existing ancestor must be a writable folder.
    Raises ValueError naming the folder.
    """
    folder = Path(folder)
    probe = folder
    if not create:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ValueError(f"{what} {str(folder)!r} is not writable: {exc.strerror or exc}") from None


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """The folders of ``folder``'s path that do not exist yet, deepest first (see :func:`remove_empty`)."""
    folder = Path(folder).absolute()
    return [p for p in [folder, *folder.parents] if not p.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove the given folders (deepest first) while they are empty: undoes what a failed run created."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            return


#: Name of the logger that receives COLMAP's messages.
COLMAP_LOGGER = "mast3r_colmap.colmap"
#: Python level of COLMAP's (glog) INFO, WARNING, ERROR and FATAL messages.
COLMAP_LEVELS = {"I": logging.DEBUG, "W": logging.INFO, "E": logging.WARNING, "F": logging.CRITICAL}
_GLOG_LINE = re.compile(r"([IWEF])\d{8} [\d:.]+\s+\d+ ([^\]]*)\] ?(.*)")


def colmap_min_log_level(log: logging.Logger | None = None) -> int:
    """The ``pycolmap.logging.minloglevel`` (0 = INFO ... 3 = FATAL) that keeps the COLMAP messages
    ``log`` (default the ``mast3r_colmap.colmap`` logger) would show."""
    log = log or logging.getLogger(COLMAP_LOGGER)
    return next((i for i, c in enumerate("IWE") if log.isEnabledFor(COLMAP_LEVELS[c])), 3)


def configure_colmap_logging() -> None:
    """No COLMAP log files anywhere, and ``pycolmap.logging.minloglevel`` from the Python log level."""
    import pycolmap

    glog = pycolmap.logging
    for level in (glog.INFO, glog.WARNING, glog.ERROR, glog.FATAL):
        glog.set_log_destination(level, "")  # an empty name turns the file of that level off
    glog.logtostderr = False
    glog.minloglevel = colmap_min_log_level()


@contextmanager
def colmap_log_to_python(folder: str | os.PathLike) -> Iterator[None]:
    """Send COLMAP's messages to the ``mast3r_colmap.colmap`` logger (levels :data:`COLMAP_LEVELS`) while
    the block runs, instead of to stderr and the temp folder.

    glog writes a ``colmap.log.*`` file into ``folder`` (a scratch folder the caller removes); a thread
    forwards its lines as they come (glog buffers INFO lines for up to 30 s, warnings come at once).
    ``minloglevel`` is raised to what the logger shows, never lowered. glog's settings are process-wide:
    one block at a time. Afterwards, glog's log files are off (see :func:`configure_colmap_logging`).
    """
    import pycolmap

    glog = pycolmap.logging
    log = logging.getLogger(COLMAP_LOGGER)
    saved = (glog.minloglevel, glog.logtostderr, glog.alsologtostderr, glog.stderrthreshold)
    glog.minloglevel = max(glog.minloglevel, colmap_min_log_level(log))
    glog.logtostderr, glog.alsologtostderr, glog.stderrthreshold = False, False, 3
    for level in (glog.WARNING, glog.ERROR, glog.FATAL):
        glog.set_log_destination(level, "")
    prefix = Path(folder) / "colmap.log."
    glog.set_log_destination(glog.INFO, str(prefix))  # the INFO file holds the messages of every level
    stop = threading.Event()
    follower = threading.Thread(target=_follow_glog, args=(Path(folder), prefix.name, log, stop),
                                name="colmap-log", daemon=True)
    follower.start()
    try:
        yield
    finally:
        glog.set_log_destination(glog.INFO, "")  # closes (and flushes) the file
        stop.set()
        follower.join()
        glog.minloglevel, glog.logtostderr, glog.alsologtostderr, glog.stderrthreshold = saved


def _follow_glog(folder: Path, prefix: str, log: logging.Logger, stop: threading.Event) -> None:
    """Forward the lines of glog's file(s) ``folder/prefix*`` to ``log`` until ``stop`` is set, then the rest.

    Lines that do not start like a glog message (glog's file header, continued messages) are skipped
    before the first message and take the level of the message they continue after it.
    """
    offsets: dict[Path, int] = {}
    level: dict[Path, int] = {}
    pending: dict[Path, str] = {}
    while True:
        last_round = stop.is_set()
        for path in sorted(folder.glob(prefix + "*")):
            try:
                with open(path, "rb") as f:
                    f.seek(offsets.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            offsets[path] = offsets.get(path, 0) + len(data)
            text = pending.pop(path, "") + data.decode("utf-8", "replace")
            lines = text.split("\n")
            if not last_round:
                pending[path] = lines.pop()  # a line still being written
            for line in lines:
                m = _GLOG_LINE.match(line)
                if m:
                    level[path] = COLMAP_LEVELS[m.group(1)]
                    log.log(level[path], "%s (%s)", m.group(3), m.group(2))
                elif line and path in level:
                    log.log(level[path], "%s", line)
        if last_round:
            return
        stop.wait(0.2)
