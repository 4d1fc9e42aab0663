"""Matching cut into shards: independent workers, one match store each, merged into one database.

A collection of 10k-100k photos needs many GPUs for matching and then one COLMAP database. The scheduled
pair list of a run is cut into ``N`` shards (:func:`partition_pairs`); each shard is matched by a worker of
its own (a SLURM array task, a torchrun rank, a Ray task: see :mod:`~.executors`) into its own
:class:`~.store.MatchStore` file beside the run's match store (:func:`shard_store_path`)::

    DB.mast3r-matches.sqlite                    the run's own store (the merge, or a run without shards)
    DB.mast3r-matches.shard-03-of-08.sqlite     shard 3 of 8, written by its worker only

Why files, not one shared SQLite file: SQLite has one writer at a time and its locks are not reliable on
shared (network) file systems, so each store has exactly one writer, the worker of its shard, which holds
the shard store's lock (:func:`~.lock.database_lock` of the store file: two workers of one shard cannot
both write it; workers of different shards never wait for each other, nor for the database, which they do
not touch). A killed or failed worker loses at most the pair in flight: started again (by hand, by SLURM's
requeue, by torchrun's restarts or by Ray's retries) it matches only what its store still lacks.

The merge (:func:`~.pipeline.match_into_database`) opens the run's store and every shard store beside it
(:func:`open_shard_stores`: read-only, SQLite's ``mode=ro``, each under its lock so that a shard still
being written is refused), matches into the run's store whatever no store holds yet, and consolidates the
pairs of all stores read as one (:class:`StoreChain`). Consolidation does not depend on the order of the
pairs (:mod:`~.keypoints`), so the database is the same whichever store holds which pair, and whatever
the number of shards: a run without shards is the case of one store.

Locality (:func:`partition_pairs`): a shard's worker encodes every image of its pairs at least once, so
a shard should touch few images. The pairs are put in the cache-friendly order of
:func:`~.matching.schedule.schedule_pairs` (images numbered along a reverse Cuthill-McKee order of the
pair graph, pairs taken block by block) and cut into ``N`` contiguous runs of equal length: a shard holds
the pairs of a band of neighbouring images. :func:`shard_report` counts the images and encoder runs of
each shard.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from .lock import database_lock
from .matching.schedule import count_encodings, schedule_pairs
from .store import MatchStore
from .structures import PairMatches

__all__ = ["Shard", "StoreChain", "find_shard_stores", "open_shard_stores", "parse_shard", "partition_pairs",
           "remove_shard_stores", "remove_store_files", "shard_report", "shard_store_path"]

logger = logging.getLogger(__name__)

Pair = Tuple[str, str]

_SHARD_NAME = re.compile(r"\.shard-(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (from 0) of ``count``, with its pairs in the order they were cut."""

    index: int
    count: int
    pairs: Tuple[Pair, ...]

    @property
    def label(self) -> str:
        """``"i/N"``, as ``--shard`` takes it."""
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Tuple[int, int]:
    """``"i/N"`` (``--shard``, e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) -> ``(i, N)``, ``0 <= i < N``.

    Raises:
        ValueError: anything else, saying what is expected.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None:
        raise ValueError(f"--shard {text!r}: expected I/N, the shard index I (from 0) and the number of shards N, "
                         "e.g. 3/8 or $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-7")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ValueError(f"--shard {text!r}: need N >= 1 and 0 <= I < N (shards are numbered from 0: a SLURM "
                         "array for N shards is --array=0-(N-1))")
    return index, count


def _check_count(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of shards must be an integer >= 1, got {count!r}")
    return count


def partition_pairs(pairs: Sequence[Pair], count: int, cache_size: int) -> List[Shard]:
    """Cut ``pairs`` into ``count`` shards by graph locality (see the module docstring).

    The pairs are ordered by :func:`~.matching.schedule.schedule_pairs` for an encoding cache of
    ``cache_size`` images and cut into contiguous runs whose lengths differ by at most one (the first
    ``len(pairs) % count`` shards get one more). Every pair goes to exactly one shard, with its
    orientation; repeats are kept. Deterministic: workers that cut the same pairs with the same numbers
    get the same shards.
    """
    _check_count(count)
    ordered = schedule_pairs([tuple(p) for p in pairs], cache_size)
    size, extra = divmod(len(ordered), count)
    shards, start = [], 0
    for index in range(count):
        stop = start + size + (1 if index < extra else 0)
        shards.append(Shard(index, count, tuple(ordered[start:stop])))
        start = stop
    return shards


def shard_report(shards: Sequence[Shard], cache_size: int) -> List[Dict[str, int]]:
    """Per shard: ``pairs``, ``images`` (distinct images of its pairs: what its worker encodes at least) and
    ``encoder_runs`` (what it encodes with an LRU cache of ``cache_size`` images, matching its pairs in the
    order they were cut; :func:`~.matching.schedule.count_encodings`). Logs one line for all shards."""
    rows = [{"shard": s.index, "pairs": len(s.pairs), "images": len({n for p in s.pairs for n in p}),
             "encoder_runs": count_encodings(s.pairs, cache_size) if s.pairs else 0} for s in shards]
    if rows:
        images = len({n for s in shards for p in s.pairs for n in p})
        runs = sum(r["encoder_runs"] for r in rows)
        logger.info("%d shards: %d-%d pairs, %d-%d images and %d-%d encoder runs each; %d encoder runs for %d "
                    "images in all (%.2f per image, cache of %d)", len(rows),
                    min(r["pairs"] for r in rows), max(r["pairs"] for r in rows),
                    min(r["images"] for r in rows), max(r["images"] for r in rows),
                    min(r["encoder_runs"] for r in rows), max(r["encoder_runs"] for r in rows),
                    runs, images, runs / max(images, 1), cache_size)
        for row in rows:
            logger.debug("shard %d/%d: %d pairs over %d images, %d encoder runs", row["shard"], len(rows),
                         row["pairs"], row["images"], row["encoder_runs"])
    return rows


# ---- files -------------------------------------------------------------------------------------------

def _stem_suffix(store_path: Path) -> Tuple[str, str]:
    name = store_path.name
    return (name[: -len(".sqlite")], ".sqlite") if name.endswith(".sqlite") else (name, "")


def shard_store_path(store_path: str | os.PathLike, index: int, count: int) -> Path:
    """The store of shard ``index`` of ``count`` beside the run's store ``store_path``:
    ``DB.mast3r-matches.sqlite`` -> ``DB.mast3r-matches.shard-03-of-08.sqlite``."""
    _check_count(count)
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in 0..{count - 1}")
    store_path = Path(store_path)
    stem, suffix = _stem_suffix(store_path)
    width = max(2, len(str(count)))
    return store_path.with_name(f"{stem}.shard-{index:0{width}d}-of-{count:0{width}d}{suffix}")


def find_shard_stores(store_path: str | os.PathLike) -> List[Path]:
    """Every shard store beside ``store_path`` (of any number of shards), sorted by (N, i)."""
    store_path = Path(store_path)
    stem, suffix = _stem_suffix(store_path)
    folder = store_path.parent
    if not folder.is_dir():
        return []
    found = []
    for entry in os.scandir(folder):
        name = entry.name
        if not (name.startswith(stem) and name.endswith(suffix) and entry.is_file()):
            continue
        match = _SHARD_NAME.fullmatch(name[len(stem): len(name) - len(suffix)])
        if match is not None:
            found.append(((int(match.group(2)), int(match.group(1))), folder / name))
    return [path for _, path in sorted(found)]


def remove_shard_stores(store_path: str | os.PathLike) -> List[Path]:
    """Delete every shard store beside ``store_path`` with its SQLite ``-wal`` / ``-shm`` companions; returns
    the files deleted. Each is deleted under its lock: a shard still being written raises ValueError."""
    removed = []
    for path in find_shard_stores(store_path):
        with database_lock(path):
            removed.extend(remove_store_files(path))
    return removed


def remove_store_files(path: str | os.PathLike) -> List[Path]:
    """Delete one SQLite store and its ``-wal`` / ``-shm`` files; returns the files deleted."""
    path = Path(path)
    removed = []
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.is_file():
            file.unlink()
            removed.append(file)
    return removed


@contextlib.contextmanager
def open_shard_stores(store_path: str | os.PathLike, config: str,
                      image_dir: Optional[str | os.PathLike] = None) -> Iterator[List[MatchStore]]:
    """Every shard store beside ``store_path``, opened read-only, each under its lock for the block.

    Raises:
        ValueError: a shard store is being written (its lock is held: a shard worker still runs), or
            cannot be opened.
    """
    with contextlib.ExitStack() as stack:
        stores = []
        for path in find_shard_stores(store_path):
            try:
                stack.enter_context(database_lock(path))
            except ValueError as exc:
                raise ValueError(f"shard store {str(path)!r} is still being matched ({exc}); merge once the "
                                 "shard runs have ended") from None
            stores.append(stack.enter_context(MatchStore(path, config, image_dir, read_only=True)))
        if stores:
            logger.info("reading %d shard store(s) beside %s", len(stores), store_path)
        yield stores


class StoreChain:
    """Several match stores read as one: each pair comes from the first store (in the given order) that
    holds it. Stores are read one after the other, each for the pairs it holds, so the order in which pairs
    come out depends on the order of the stores (consolidation does not; see the module docstring)."""

    def __init__(self, stores: Sequence[MatchStore]):
        self.stores = list(stores)
        self._first: Dict[frozenset, int] = {}
        for i, store in enumerate(self.stores):
            for key in store.done_pairs():
                self._first.setdefault(key, i)

    def done_pairs(self) -> Set[frozenset]:
        """The unordered pairs some store holds (fresh, for its configuration)."""
        return set(self._first)

    def holder(self, pair: Pair) -> Optional[int]:
        """Index of the first store that holds ``pair`` (either orientation), None if none does."""
        return self._first.get(frozenset(pair))

    def get_many(self, pairs: Iterable[Pair]) -> Iterator[PairMatches]:
        """The stored matches of ``pairs`` (each oriented as asked, repeats kept), store after store.

        Raises:
            KeyError: a pair no store holds (before anything is read).
        """
        by_store: List[List[Pair]] = [[] for _ in self.stores]
        for pair in pairs:
            i = self.holder(pair)
            if i is None:
                raise KeyError(tuple(pair))
            by_store[i].append(tuple(pair))
        for store, wanted in zip(self.stores, by_store):
            yield from store.get_many(wanted)
