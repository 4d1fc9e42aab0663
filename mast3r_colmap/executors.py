"""Who matches the shards of a run (:mod:`~.shards`): this process, torchrun's ranks or a Ray cluster.

=============  ===============================================================  ==========================
executor       how the shards are matched                                       who merges
=============  ===============================================================  ==========================
``local``      one after the other, in this process (:func:`run_local`)         this process
torchrun       rank ``r`` matches shard ``r`` of ``WORLD_SIZE`` (gloo group)     rank 0, once all are done
``ray``        one Ray task per shard, ``num_gpus`` and ``max_retries`` per      the driver, once all tasks
               task, progress summed in the driver (:func:`run_ray`)            are done
``--shard``    one shard per command (a SLURM job array, any launcher):         a later command without
               :func:`match_shard`                                               ``--shard``
=============  ===============================================================  ==========================

The merge is :func:`~.pipeline.reconstruct` itself: :class:`ShardedMatching` (local, Ray) and
:class:`TorchrunMatching` are its ``match_shards`` hook, called with the pairs that the database lacks and
no store holds (a re-run after a failure gives the shards only what is left); the hook cuts them into shards and has them matched into the shard stores, then ``reconstruct`` reads every
store, matches what is still missing, consolidates, writes the database, verifies and maps. Without the
hook (a run of one process) it is the same code with one store.

Every worker builds its own matcher with a *matcher factory*: a picklable callable without arguments
that returns a matcher (the command line's loads the checkpoint on the worker's GPU; the tests' builds a
:class:`~.matching.matcher.Matcher` over the synthetic descriptor source). Ray pickles it to its workers.

Retries and scheduling are the launcher's: Ray retries a task whose worker died (``max_retries``) and
places tasks on nodes with the GPUs they ask for; torchrun restarts the ranks (``--max-restarts``) when
one fails; SLURM requeues array tasks. Whatever restarts a shard, it resumes from its store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from .lock import database_lock
from .pipeline import PairMatcher, match_into_store
from .shards import Shard, partition_pairs, remove_store_files, shard_report, shard_store_path
from .store import MatchStore, config_key

__all__ = ["EXECUTORS", "MatcherFactory", "ShardResult", "ShardedMatching", "TorchrunMatching", "match_shard",
           "process_group", "rank_device", "run_local", "run_ray", "torchrun_env"]

logger = logging.getLogger(__name__)

Pair = Tuple[str, str]
#: A picklable callable without arguments that returns a matcher (see the module docstring).
MatcherFactory = Callable[[], PairMatcher]

#: ``--executor`` choices (torchrun is found from its environment, not chosen).
EXECUTORS = ("local", "ray")
#: Ray retries of a shard whose worker died (the store keeps what the dead worker matched).
MAX_RETRIES = 3
#: How long the torchrun ranks wait for each other (the slowest shard): collectives time out after this.
COLLECTIVE_TIMEOUT = timedelta(days=7)
#: Seconds between two looks of the Ray driver at its tasks' progress.
_POLL_S = 0.5


@dataclass(frozen=True)
class ShardResult:
    """What a shard worker did: ``stored_before`` of its ``num_pairs`` pairs were in its store already
    (an earlier, killed attempt), it matched ``matched`` (their sum is ``num_pairs``), running the encoder
    ``encoder_runs`` times (None for a matcher that does not count them)."""

    index: int
    count: int
    store: str
    num_pairs: int
    stored_before: int
    matched: int
    encoder_runs: Optional[int]

    def as_dict(self) -> Dict[str, Any]:
        return {"shard": f"{self.index}/{self.count}", **dataclasses.asdict(self)}


def match_shard(shard: Shard, factory: MatcherFactory, store_path: str | os.PathLike,
                image_dir: Optional[str | os.PathLike] = None, progress: bool = True, fresh: bool = False,
                on_progress: Optional[Callable[[int], None]] = None) -> ShardResult:
    """Match the pairs of ``shard`` that its store (:func:`~.shards.shard_store_path` of ``store_path``)
    lacks, into that store; the worker of one shard, whatever launched it.

    The shard store's lock is held throughout (a second worker of the same shard raises ValueError at
    once); the database is not touched. The matcher is built by ``factory`` once the lock is held, and
    not at all for a shard without pairs. ``image_dir`` (default ``matcher.image_dir``) keys the stored
    pairs by the content of the image files (see :mod:`~.store`). ``fresh`` deletes the shard's store
    first. ``on_progress(done)`` is called with the number of the shard's pairs done (stored before or
    matched now) when matching starts and after each pair.
    """
    path = shard_store_path(store_path, shard.index, shard.count)
    if not shard.pairs:
        logger.info("shard %s: no pairs", shard.label)
        return ShardResult(shard.index, shard.count, str(path), 0, 0, 0, 0)
    with database_lock(path):  # one writer per shard store; shards never wait for each other
        if fresh and remove_store_files(path):
            logger.info("shard %s: started afresh (deleted %s)", shard.label, path)
        matcher = factory()
        image_dir = image_dir if image_dir is not None else getattr(matcher, "image_dir", None)
        encodings = getattr(matcher, "encodings", None)
        misses = getattr(encodings, "misses", None)
        with MatchStore(path, config_key(matcher.settings()), image_dir) as store:
            done = store.done_pairs()
            before = sum(1 for pair in shard.pairs if frozenset(pair) in done)
            counter = [before]

            def on_pair(_: Any) -> None:
                counter[0] += 1
                on_progress(counter[0])

            if on_progress is not None:
                on_progress(before)
            matched = match_into_store(matcher, list(shard.pairs), store, progress,
                                       on_pair=on_pair if on_progress is not None else None)
    runs = encodings.misses - misses if misses is not None else None
    logger.info("shard %s: %d pairs, %d already in its store, %d matched now (%s encoder runs) -> %s", shard.label,
                len(shard.pairs), before, matched, "?" if runs is None else runs, path)
    return ShardResult(shard.index, shard.count, str(path), len(shard.pairs), before, matched, runs)


def run_local(shards: Sequence[Shard], factory: MatcherFactory, store_path: str | os.PathLike,
              image_dir: Optional[str | os.PathLike] = None, progress: bool = True) -> List[ShardResult]:
    """Match the shards one after the other in this process (:func:`match_shard`)."""
    return [match_shard(shard, factory, store_path, image_dir, progress) for shard in shards]


# ---- Ray ------------------------------------------------------------------------------------------

class _Progress:
    """A Ray actor (see :func:`run_ray`): the pairs each shard has done, summed for the driver's bar."""

    def __init__(self) -> None:
        self.done: Dict[int, int] = {}

    def set(self, index: int, done: int) -> None:
        self.done[index] = done  # absolute: a retried task starts again from what its store holds

    def total(self) -> int:
        return sum(self.done.values())


def _ray_task(shard: Shard, factory: MatcherFactory, store_path: str, image_dir: Optional[str],
              progress: Any) -> ShardResult:
    """The body of a shard's Ray task (a worker process of the cluster)."""
    return match_shard(shard, factory, store_path, image_dir, progress=False,
                       on_progress=lambda done: progress.set.remote(shard.index, done))


def ray_slots(gpus_per_shard: float) -> int:
    """How many shards the connected Ray cluster runs at once: its GPUs / ``gpus_per_shard``, or its CPUs
    when shards use no GPU (at least 1)."""
    import ray

    resources = ray.cluster_resources()
    if gpus_per_shard > 0:
        return max(1, int(resources.get("GPU", 0) // gpus_per_shard))
    return max(1, int(resources.get("CPU", 1)))


@contextlib.contextmanager
def _ray_connection(address: Optional[str]) -> Iterator[Any]:
    """``ray`` connected to the cluster at ``address`` (None: ``RAY_ADDRESS``, else a new local one), or as
    the caller initialised it; a connection made here is closed at the end."""
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install \"mast3r-colmap[ray]\"") from None
    if ray.is_initialized():
        yield ray
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False)  # a local cluster of this machine
    else:
        ray.init(address=address)
    try:
        yield ray
    finally:
        ray.shutdown()


def run_ray(shards: Sequence[Shard], factory: MatcherFactory, store_path: str | os.PathLike,
            image_dir: Optional[str | os.PathLike] = None, gpus_per_shard: float = 1.0,
            max_retries: int = MAX_RETRIES, progress: bool = True) -> List[ShardResult]:
    """Match each shard in a Ray task of the connected cluster (``ray.init`` first, or use
    :class:`ShardedMatching`, which connects): ``num_gpus=gpus_per_shard``, retried ``max_retries`` times
    when its worker dies (it resumes from its store). The driver shows one progress bar of all shards'
    pairs (a Ray actor sums what the tasks report) and returns when every task has ended.

    The workers must see the image folder and the store's folder at the same paths (a shared file system)
    and have mast3r-colmap installed.

    Raises:
        ValueError: the cluster has fewer GPUs than one shard asks for, or a shard refused its input (the
            task's own ValueError / OSError message).
        RuntimeError: shards that still failed after their retries (named, with Ray's reason).
    """
    import ray

    if gpus_per_shard > 0 and ray.cluster_resources().get("GPU", 0) < gpus_per_shard:
        raise ValueError(f"the Ray cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs, fewer than "
                         f"--gpus-per-shard {gpus_per_shard:g}: use --gpus-per-shard 0 to match on CPUs")
    work = [s for s in shards if s.pairs]
    counter = ray.remote(num_cpus=0)(_Progress).remote()
    task = ray.remote(_ray_task).options(num_gpus=gpus_per_shard, max_retries=max_retries)
    image_dir = None if image_dir is None else str(image_dir)
    refs = {task.remote(shard, factory, str(store_path), image_dir, counter): shard for shard in work}
    logger.info("ray: %d shard tasks (%g GPU each, %d retries) on a cluster of %s", len(refs), gpus_per_shard,
                max_retries, ray.cluster_resources())
    results = [match_shard(s, factory, store_path, image_dir, progress=False) for s in shards if not s.pairs]
    failed: List[Tuple[Shard, BaseException]] = []
    bar = tqdm(total=sum(len(s.pairs) for s in work), desc="matching shards", unit="pair", disable=not progress)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S)
        for ref in ready:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as exc:
                failed.append((refs[ref], exc))
        bar.n = ray.get(counter.total.remote())
        bar.set_postfix(shards=f"{len(refs) - len(pending)}/{len(refs)}")
    bar.close()
    ray.kill(counter)
    for shard, exc in failed:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, (ValueError, OSError)):  # bad input in a worker: one message, as in this process
            raise ValueError(f"shard {shard.label}: {cause}") from None
    if failed:
        raise RuntimeError("; ".join(f"shard {s.label} failed after {max_retries} retries: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}" for s, e in failed)
                           + ". Their stores keep the pairs matched so far: run the same command again to resume")
    return sorted(results, key=lambda r: r.index)


# ---- the hook of reconstruct ----------------------------------------------------------------------

class ShardedMatching:
    """:func:`~.pipeline.reconstruct`'s ``match_shards`` hook: cut the pairs into ``num_shards`` shards
    (:func:`~.shards.partition_pairs`, for an encoding cache of ``cache_size`` images) and match them with
    ``executor`` ("local": :func:`run_local`; "ray": :func:`run_ray`, connecting to ``ray_address``).

    ``num_shards`` None: one per GPU slot of the Ray cluster (:func:`ray_slots`), 1 locally. The results of
    the last call are in :attr:`results`, the report of the cut (:func:`~.shards.shard_report`) in
    :attr:`report`.
    """

    def __init__(self, factory: MatcherFactory, num_shards: Optional[int] = None, executor: str = "local",
                 cache_size: Optional[int] = None, progress: bool = True, ray_address: Optional[str] = None,
                 gpus_per_shard: float = 1.0, max_retries: int = MAX_RETRIES):
        if executor not in EXECUTORS:
            raise ValueError(f"unknown executor {executor!r}: choose from {', '.join(EXECUTORS)}")
        if num_shards is not None and (isinstance(num_shards, bool) or not isinstance(num_shards, int)
                                       or num_shards < 1):
            raise ValueError(f"the number of shards must be an integer >= 1, got {num_shards!r}")
        if gpus_per_shard < 0:
            raise ValueError(f"--gpus-per-shard must be >= 0, got {gpus_per_shard:g}")
        if cache_size is None:
            from .matching.matcher import MatcherConfig

            cache_size = MatcherConfig.cache_size
        self.factory, self.num_shards, self.executor = factory, num_shards, executor
        self.cache_size, self.progress, self.ray_address = cache_size, progress, ray_address
        self.gpus_per_shard, self.max_retries = gpus_per_shard, max_retries
        self.results: List[ShardResult] = []
        self.report: List[Dict[str, int]] = []

    def _cut(self, pairs: Sequence[Pair], count: int) -> List[Shard]:
        shards = partition_pairs(pairs, count, self.cache_size)
        self.report = shard_report(shards, self.cache_size)
        return shards

    def __call__(self, pairs: Sequence[Pair], store_path: str | os.PathLike,
                 image_dir: Optional[str | os.PathLike] = None) -> List[ShardResult]:
        if self.executor == "local":
            shards = self._cut(pairs, self.num_shards or 1)
            self.results = run_local(shards, self.factory, store_path, image_dir, self.progress)
            return self.results
        with _ray_connection(self.ray_address):
            shards = self._cut(pairs, self.num_shards or ray_slots(self.gpus_per_shard))
            self.results = run_ray(shards, self.factory, store_path, image_dir, self.gpus_per_shard,
                                   self.max_retries, self.progress)
        return self.results


# ---- torchrun -------------------------------------------------------------------------------------

def torchrun_env() -> Optional[Tuple[int, int, int]]:
    """``(rank, world size, local rank)`` of a process started by torchrun (``RANK`` and ``WORLD_SIZE`` set,
    ``WORLD_SIZE`` > 1), else None (a world of one is a run of one process).

    Raises:
        ValueError: values that are not integers with ``0 <= RANK < WORLD_SIZE``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r} / LOCAL_RANK="
                         f"{os.environ.get('LOCAL_RANK')!r} are not integers (set by torchrun)") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in 0..WORLD_SIZE-1={world - 1}")
    return (rank, world, local) if world > 1 else None


def rank_device(device: Any, local_rank: int) -> Any:
    """The device of a torchrun rank: a CUDA device without an index becomes ``cuda:LOCAL_RANK`` (modulo the
    GPUs of the node), anything else stays."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return device


@contextlib.contextmanager
def process_group(timeout: timedelta = COLLECTIVE_TIMEOUT) -> Iterator[Any]:
    """``torch.distributed`` with the gloo group of torchrun's environment (made here unless the caller made
    one, and then destroyed at the end); yields the ``torch.distributed`` module. Collectives wait up to
    ``timeout`` (the ranks wait for the slowest shard)."""
    import torch.distributed as dist

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", timeout=timeout)
    try:
        yield dist
    finally:
        if made:
            dist.destroy_process_group()


class TorchrunMatching:
    """The shards of torchrun's ranks: rank ``r`` of ``WORLD_SIZE`` matches shard ``r`` (inside
    :func:`process_group`).

    Rank 0 runs :func:`~.pipeline.reconstruct` with this object as its ``match_shards`` hook: the call
    hands the pairs to every rank (``broadcast_object_list``), matches shard 0 and gathers the results of
    all ranks (``gather_object``: rank 0 goes on to the merge once every rank has finished its shard); it
    must call :meth:`close` when it ends, so that the other ranks are released if it stopped before
    handing out pairs. The other ranks call :meth:`follow`. A rank that fails ends the run (torchrun stops
    the others); started again, every shard resumes from its store.

    Rank 0 cuts the shards for an encoding cache of ``cache_size`` images (default
    ``MatcherConfig.cache_size``) and hands that number out with the pairs, so every rank cuts the same.
    """

    def __init__(self, factory: MatcherFactory, rank: int, world_size: int, cache_size: Optional[int] = None,
                 progress: bool = True):
        self.factory, self.rank, self.world_size = factory, rank, world_size
        self.cache_size, self.progress = cache_size, progress
        self.results: List[ShardResult] = []
        self.report: List[Dict[str, int]] = []
        self._sent = False

    def _broadcast(self, message: Any) -> Any:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def __call__(self, pairs: Sequence[Pair], store_path: str | os.PathLike,
                 image_dir: Optional[str | os.PathLike] = None) -> List[ShardResult]:
        if self.rank != 0:
            raise RuntimeError("only rank 0 runs the pipeline; the other ranks call follow()")
        if self._sent:
            raise RuntimeError("the pairs of this torchrun run were handed out already")
        if self.cache_size is None:
            from .matching.matcher import MatcherConfig

            self.cache_size = MatcherConfig.cache_size
        message = ([tuple(p) for p in pairs], str(store_path), None if image_dir is None else str(image_dir),
                   self.cache_size)
        self._broadcast(message)
        self._sent = True
        return self._match(*message)

    def follow(self) -> Optional[ShardResult]:
        """A rank other than 0: wait for the pairs, match this rank's shard, hand the result to rank 0.
        Returns None when rank 0 ended without handing out pairs."""
        message = self._broadcast(None)
        if message is None:
            logger.info("rank %d: rank 0 ended before matching; nothing to do", self.rank)
            return None
        return self._match(*message)[0]

    def close(self) -> None:
        """Rank 0, when it ends: release the other ranks if the pairs were never handed out."""
        if self.rank == 0 and not self._sent:
            self._sent = True
            self._broadcast(None)

    def _match(self, pairs: List[Pair], store_path: str, image_dir: Optional[str], cache_size: int
               ) -> List[ShardResult]:
        import torch.distributed as dist

        shards = partition_pairs(pairs, self.world_size, cache_size)
        if self.rank == 0:
            self.report = shard_report(shards, cache_size)
        result = match_shard(shards[self.rank], self.factory, store_path, image_dir,
                             progress=self.progress and self.rank == 0)
        gathered: Optional[List[Any]] = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(result, gathered, dst=0)  # rank 0 waits here for every shard
        self.results = list(gathered) if gathered is not None else [result]
        return self.results
