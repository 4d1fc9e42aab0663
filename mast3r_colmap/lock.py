"""One run per database: an advisory lock file beside it, ``DATABASE.lock``, holding the holder's PID.

Two runs writing one COLMAP database at the same time would both match everything and then collide in
SQLite ("constraint failed"). :func:`database_lock` makes the second one stop at once instead, with
``ValueError("database ... is in use by process N ...")`` (the command lines turn it into exit code 2).
The top-level writers of a database (:func:`~.pipeline.reconstruct`, :func:`~.localize.triangulate_reference`)
hold it for their whole call through the :func:`locks_database` decorator.

How it works
------------
* The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``DATABASE.lock``. The kernel drops it when the holder
  exits in any way, ``kill -9`` included, so a lock file left by a dead process is stale: the next run
  simply takes it over (and logs the dead PID).
* The holder writes its PID into the file; a run that finds the lock taken reads it for the message.
* On release the holder unlinks the file while still holding the lock. A run that opened the old file
  just before may then lock an unlinked inode, so after locking it checks that the path still names
  the inode it locked, and starts over if not.
* Reentrant within a thread: a nested :func:`database_lock` of the same database in the thread that
  holds it (e.g. a command line that locks early around :func:`~.pipeline.reconstruct`) is a no-op;
  the lock goes when the outermost block ends. Another thread of the holding process gets the same
  ValueError as another process (naming this process).
* Advisory: it only keeps out other users of this function, not COLMAP or other tools. Children forked
  while the lock is held share it (same open file) until they exit; the file is opened close-on-exec.

Written by hand rather than with the ``filelock`` package because ``filelock`` cannot tell who holds a
lock, and the PID of the holder is the point of the message. POSIX only (``fcntl``); where ``fcntl`` is
missing (Windows) the lock is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["database_lock", "lock_path", "locks_database"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: How long a run that finds the lock taken waits for the holder to have written its PID.
_PID_WAIT_S = 1.0

# The locks this process holds: real path of the lock file -> ident of the thread that holds it.
_held: dict[str, int] = {}
_held_guard = threading.Lock()


def lock_path(database: str | os.PathLike) -> Path:
    """The lock file of a database: ``DATABASE.lock`` beside it."""
    database = Path(database)
    return database.with_name(database.name + ".lock")


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _holder(fd: int) -> Optional[int]:
    """PID written by the process that holds the lock on ``fd``'s file (it may be about to write it)."""
    deadline = time.monotonic() + _PID_WAIT_S
    while True:
        pid = _read_pid(fd)
        if pid is not None or time.monotonic() >= deadline:
            return pid
        time.sleep(0.02)


def _in_use(database: Path, path: Path, pid: Optional[int]) -> ValueError:
    who = f"process {pid}" if pid is not None else "another process"
    if pid == os.getpid():
        who += " (this process, another thread)"
    return ValueError(f"database {str(database)!r} is in use by {who}; wait for it to finish "
                      f"(lock file {str(path)!r})")


def _acquire(path: Path, database: Path) -> int:
    """Lock ``path`` and return its open descriptor, holding our PID; ValueError if another holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if not path.parent.is_dir():
                raise ValueError(f"cannot create database {str(database)!r}: folder {str(path.parent)!r} "
                                 "does not exist") from None
            raise ValueError(f"cannot create the lock file {str(path)!r} of database {str(database)!r} "
                             f"(folder not writable?): {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            pid = _holder(fd)
            os.close(fd)
            raise _in_use(database, path, pid) from None
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if not same:  # the holder released and unlinked it between our open and our lock: start over
            os.close(fd)
            continue
        stale = _read_pid(fd)
        if stale is not None:
            logger.info("taking over the lock of database %s left by process %d, which has ended",
                        database, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return fd


def _release(path: Path, fd: int) -> None:
    try:
        os.unlink(path)  # still locked: a run that opened this inode meanwhile notices and starts over
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove the lock file %s: %s", path, exc)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def database_lock(database: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of ``database`` for the block; yields the lock file's path.

    Nested use in the thread that holds the lock is allowed (see the module docstring).

    Raises:
        ValueError: another process, or another thread of this one, holds it:
            ``"database ... is in use by process N ..."``; or the lock file cannot be created.
    """
    database = Path(database)
    path = lock_path(database)
    if fcntl is None:  # pragma: no cover - Windows
        logger.warning("no fcntl on this platform: database %s is not locked against concurrent runs", database)
        yield path
        return
    key = os.path.join(os.path.realpath(path.parent), path.name)
    me = threading.get_ident()
    with _held_guard:
        holder = _held.get(key)
    if holder == me:  # nested: the outer block holds the lock and releases it
        yield path
        return
    if holder is not None:
        raise _in_use(database, path, os.getpid())
    fd = _acquire(path, database)  # another thread racing us here fails in flock: one open file each
    with _held_guard:
        _held[key] = me
    logger.debug("locked database %s (%s)", database, path)
    try:
        yield path
    finally:
        with _held_guard:
            del _held[key]
        _release(path, fd)


def locks_database(param: str = "database") -> Callable[[F], F]:
    """Decorator: each call of the function holds :func:`database_lock` of its argument ``param``.

    For the top-level writers of a database (a whole run), so that the lock covers every exit path.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        if param not in signature.parameters:
            raise TypeError(f"{fn.__qualname__} has no parameter {param!r}")

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with database_lock(bound.arguments[param]):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
