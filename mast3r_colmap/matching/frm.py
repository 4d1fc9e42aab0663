"""Fast reciprocal nearest-neighbour matching (FRM) of dense descriptor maps.

Clean-room implementation of the official behaviour (checked against the golden vectors
``tests/data/frm*.npz``): seeds on a sub-sampled grid of image 1 walk image 1 -> image 2 -> image 1 along
nearest neighbours until they come back to where they started (a reciprocal pair),
for at most 10 iterations.

Nearest neighbour = argmax of the float32 dot product; exact ties go to the smallest
database flat index. Coordinates are integer ``(x, y)`` pixels, flat index ``y * W + x``.

The search is a blocked exact torch search (:class:`_TorchSearch`), on the device of the
descriptors. It beats faiss ``IndexFlatIP`` for these searches (few queries, low dimension) on
CPU and on CUDA (measured with ``benchmarks/bench_matching.py`` when both existed), so faiss is
not used.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = [
    "fast_reciprocal_nns",
    "mutual_nearest_neighbours",
    "nearest_neighbours",
    "merge_corres",
    "grid_seeds",
]

MAX_ITER = 10
"""Maximum number of walk iterations with an integer grid of seeds."""

# Default tiles: (query rows, database rows) per matrix product.
_CPU_QUERY_BLOCK = 1024
_CPU_TILE_ELEMS = 2**21  # ~8 MB of float32 scores per tile
_CUDA_QUERY_BLOCK = 8192
_CUDA_TILE_ELEMS = 2**26  # ~256 MB of float32 scores per tile


# --------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------
def _as_tensor(desc: ArrayLike, name: str, device: torch.device | None = None) -> torch.Tensor:
    """Return ``desc`` as a float32 (H, W, D) torch tensor (no copy when possible)."""
    if isinstance(desc, np.ndarray):
        arr = np.ascontiguousarray(desc, dtype=np.float32)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays
            arr = arr.copy()
        t = torch.from_numpy(arr)
    elif isinstance(desc, torch.Tensor):
        t = desc.detach()
        if t.dtype != torch.float32:
            t = t.float()
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(desc).__name__}")
    if t.ndim != 3:
        raise ValueError(f"{name} must be a dense (H, W, D) descriptor map, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        t = t.to(device)
    return t


def _check_pair(desc1: ArrayLike, desc2: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    d1 = _as_tensor(desc1, "desc1")
    d2 = _as_tensor(desc2, "desc2", device=d1.device)
    if d1.shape[-1] != d2.shape[-1]:
        raise ValueError(
            f"descriptor dimensions differ: desc1 has D={d1.shape[-1]} (shape {tuple(d1.shape)}), "
            f"desc2 has D={d2.shape[-1]} (shape {tuple(d2.shape)})"
        )
    return d1, d2


@contextlib.contextmanager
def _exact_fp32_matmul() -> Iterator[None]:
    """Force true float32 matmuls (no TF32 / bf16 shortcuts) inside the block, then restore.

    Uses the legacy global switch when its state is readable (it keeps the legacy and the
    per-backend flags consistent); if the caller mixed the two APIs, uses the per-backend
    ``fp32_precision`` flags instead. Not thread-safe (torch's flags are process-global).
    """
    try:
        legacy: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:  # legacy and new precision APIs were mixed by the caller
        legacy = None
    if legacy == "highest":
        yield
        return
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(legacy)
        return
    flags = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    old = [f.fp32_precision for f in flags]
    try:
        for f in flags:
            f.fp32_precision = "ieee"
        yield
    finally:
        for f, o in zip(flags, old):
            f.fp32_precision = o


# --------------------------------------------------------------------------------------
# exact nearest-neighbour engines
# --------------------------------------------------------------------------------------
class _TorchSearch:
    """Exact argmax-of-dot-product search, blocked over queries and database.

    Pass 1 computes, per query and database tile, only the tile maximum (``amax`` is an
    order of magnitude cheaper than ``argmax`` on CPU); the winning tile is the *first* tile
    holding the global maximum. Pass 2 recomputes the scores of that tile alone and takes
    its first maximum. Together this is exactly "first maximum index" over the database.
    """

    def __init__(self, db: torch.Tensor, block_size: int | None = None) -> None:
        self.db = db.contiguous()  # (N, D); tiles are used as transposed views (no copy)
        self.n = db.shape[0]
        self.device = db.device
        cuda = self.device.type == "cuda"
        self.query_block = _CUDA_QUERY_BLOCK if cuda else _CPU_QUERY_BLOCK
        self.tile_elems = _CUDA_TILE_ELEMS if cuda else _CPU_TILE_ELEMS
        self.block_size = block_size

    def _db_block(self, nq: int) -> int:
        if self.block_size is not None:
            return max(1, int(self.block_size))
        blk = max(2048, self.tile_elems // max(nq, 1))
        return min(self.n, blk)

    def search(self, q: torch.Tensor) -> torch.Tensor:
        """Return the (M,) int64 index of the first maximal dot product for each query row."""
        m = q.shape[0]
        out = torch.empty(m, dtype=torch.int64, device=self.device)
        if m == 0:
            return out
        with _exact_fp32_matmul(), torch.inference_mode():
            for i in range(0, m, self.query_block):
                out[i : i + self.query_block] = self._search_block(q[i : i + self.query_block])
        return out

    def _search_block(self, q: torch.Tensor) -> torch.Tensor:
        nq = q.shape[0]
        bdb = self._db_block(nq)
        starts = list(range(0, self.n, bdb))
        if len(starts) == 1:
            return torch.argmax(q @ self.db.T, dim=1)
        tile_max = torch.empty(len(starts), nq, dtype=q.dtype, device=self.device)
        scores = torch.empty(nq, bdb, dtype=q.dtype, device=self.device)
        for j, s in enumerate(starts):
            e = min(s + bdb, self.n)
            if e - s == bdb:
                torch.mm(q, self.db[s:e].T, out=scores)
                torch.amax(scores, dim=1, out=tile_max[j])
            else:
                tile_max[j] = torch.amax(q @ self.db[s:e].T, dim=1)
        best_tile = torch.argmax(tile_max, dim=0)  # first tile holding the maximum
        result = torch.empty(nq, dtype=torch.int64, device=self.device)
        tiles, inverse = torch.unique(best_tile, return_inverse=True)
        order = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=len(tiles)).tolist()
        pos = 0
        for t, c in zip(tiles.tolist(), counts):
            rows = order[pos : pos + c]
            pos += c
            s = t * bdb
            e = min(s + bdb, self.n)
            result[rows] = s + torch.argmax(q[rows] @ self.db[s:e].T, dim=1)
        return result


class _MemoNN:
    """Nearest neighbour in ``db`` of rows of ``src`` given by flat index, memoised."""

    def __init__(self, src: torch.Tensor, search) -> None:
        self.src = src
        self.search = search
        self.cache = np.full(src.shape[0], -1, dtype=np.int64)
        self.n_queries = 0

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        if idx.size == 0:
            return np.empty(0, dtype=np.int64)
        uniq = np.unique(idx)
        todo = uniq[self.cache[uniq] < 0]
        if todo.size:
            self.n_queries += todo.size
            rows = torch.from_numpy(todo).to(self.src.device)
            self.cache[todo] = self.search.search(self.src[rows]).cpu().numpy()
        return self.cache[idx]


def _memo_pair(
    desc1: torch.Tensor, desc2: torch.Tensor, block_size: int | None = None
) -> tuple[_MemoNN, _MemoNN]:
    """Memoised (NN in 2 of image-1 pixels, NN in 1 of image-2 pixels) for (H, W, D) maps.

    The reverse direction is ``tuple(reversed(...))``: FRM 1->2 and 2->1 share both caches.
    """
    pts1 = desc1.reshape(-1, desc1.shape[-1])
    pts2 = desc2.reshape(-1, desc2.shape[-1])
    return _MemoNN(pts1, _TorchSearch(pts2, block_size)), _MemoNN(pts2, _TorchSearch(pts1, block_size))


def nearest_neighbours(
    queries: ArrayLike,
    database: ArrayLike,
    block_size: int | None = None,
) -> np.ndarray:
    """Exact dot-product nearest neighbour of each query row: (M,) int64 indices into ``database``.

    ``queries`` is (M, D) and ``database`` (N, D). Ties go to the smallest database index.
    """
    q = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(np.asarray(queries))
    db = database if isinstance(database, torch.Tensor) else torch.from_numpy(np.asarray(database))
    q, db = q.detach().float(), db.detach().float().to(q.device)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ValueError(f"expected (M, D) queries and (N, D) database, got {tuple(q.shape)} and {tuple(db.shape)}")
    if db.shape[0] == 0:
        raise ValueError("empty database")
    return _TorchSearch(db, block_size).search(q).cpu().numpy()


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def grid_seeds(height: int, width: int, subsample: int) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) seed grid ``{S//2 + S*i}`` inside an (H, W) image, row-major, int64."""
    s = int(subsample)
    if s <= 0:
        raise ValueError(f"subsample must be a positive integer, got {subsample}")
    ys, xs = np.mgrid[s // 2 : height : s, s // 2 : width : s]
    return xs.ravel().astype(np.int64), ys.ravel().astype(np.int64)


def merge_corres(idx1: np.ndarray, idx2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (idx1, idx2) pairs sorted by (idx1, idx2), with the index of their first occurrence."""
    idx1 = np.asarray(idx1, dtype=np.int64)
    idx2 = np.asarray(idx2, dtype=np.int64)
    if idx1.size and (idx1.min() < 0 or idx2.min() < 0 or idx2.max() >= 2**32 or idx1.max() >= 2**31):
        raise ValueError("flat indices out of range for pair packing")
    key = (idx1 << 32) | idx2
    _, first = np.unique(key, return_index=True)
    return idx1[first], idx2[first], first.astype(np.int64)


def _flat_to_xy(idx: np.ndarray, width: int) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.int64)
    return np.stack([idx % width, idx // width], axis=-1).reshape(-1, 2)


def _seeds_to_flat(seeds: Sequence[ArrayLike], height: int, width: int) -> np.ndarray:
    if len(seeds) != 2:
        raise ValueError("seeds must be a pair (x_array, y_array)")
    x, y = (np.asarray(s.cpu() if isinstance(s, torch.Tensor) else s).ravel() for s in seeds)
    if x.shape != y.shape:
        raise ValueError(f"seed x and y arrays differ in length: {x.shape} vs {y.shape}")
    if x.size and not (np.issubdtype(x.dtype, np.integer) and np.issubdtype(y.dtype, np.integer)):
        if not (np.all(x == np.round(x)) and np.all(y == np.round(y))):
            raise ValueError("seeds must be integer pixel coordinates")
    x = x.astype(np.int64)
    y = y.astype(np.int64)
    if x.size and (x.min() < 0 or y.min() < 0 or x.max() >= width or y.max() >= height):
        raise ValueError(f"seeds outside the {height}x{width} image 1")
    return np.unique(x + width * y)


# --------------------------------------------------------------------------------------
# fast reciprocal matching
# --------------------------------------------------------------------------------------
def _frm_flat(
    desc1: torch.Tensor,
    desc2: torch.Tensor,
    subsample: int = 8,
    seeds: Sequence[ArrayLike] | None = None,
    pixel_tol: float = 0,
    block_size: int | None = None,
    nns: tuple[_MemoNN, _MemoNN] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FRM on validated (H, W, D) tensors; returns merged flat (idx1, idx2).

    ``nns`` = (NN in 2 of image-1 pixels, NN in 1 of image-2 pixels), e.g. from
    :func:`_memo_pair`, lets several calls on the same maps share their memoised searches.
    """
    h1, w1, d = desc1.shape
    h2, w2, _ = desc2.shape
    if seeds is None and pixel_tol == 0:
        xy1 = _seeds_to_flat(grid_seeds(h1, w1, subsample), h1, w1)
        max_iter = MAX_ITER
    else:
        if seeds is None:
            seeds = grid_seeds(h1, w1, subsample)
        xy1 = _seeds_to_flat(seeds, h1, w1)
        max_iter = 1
    empty = np.empty(0, dtype=np.int64)
    if xy1.size == 0 or h2 * w2 == 0:
        return empty, empty

    if nns is None:
        nns = _memo_pair(desc1, desc2, block_size)
    nn_in_2, nn_in_1 = nns

    xy2 = np.full_like(xy1, -1)
    old_xy1 = xy1.copy()
    old_xy2 = xy2.copy()
    notyet = np.ones(xy1.size, dtype=bool)
    niter = 0
    while notyet.any():
        xy2[notyet] = nn_in_2(xy1[notyet])
        notyet &= xy2 != old_xy2  # partner in image 2 unchanged: converged
        xy1[notyet] = nn_in_1(xy2[notyet])
        notyet &= xy1 != old_xy1  # back to the same pixel: reciprocal
        niter += 1
        if niter >= max_iter:
            break
        old_xy2[:] = xy2
        old_xy1[:] = xy1

    if pixel_tol > 0:
        oy, ox = np.divmod(old_xy1, w1)
        ny, nx = np.divmod(xy1, w1)
        dist = np.sqrt((oy - ny).astype(np.float64) ** 2 + (ox - nx).astype(np.float64) ** 2)
        converged = dist < pixel_tol
        xy1 = old_xy1  # explicit seeds: return the original seeds
    else:
        converged = ~notyet
    logger.debug(
        "FRM %dx%d -> %dx%d: %d seeds, %d iterations, %d converged, %d+%d NN queries",
        h1, w1, h2, w2, xy1.size, niter, int(converged.sum()), nn_in_2.n_queries, nn_in_1.n_queries,
    )
    i1, i2, _ = merge_corres(xy1[converged], xy2[converged])
    return i1, i2


def fast_reciprocal_nns(
    desc1: ArrayLike,
    desc2: ArrayLike,
    subsample: int = 8,
    seeds: Sequence[ArrayLike] | None = None,
    pixel_tol: float = 0,
    block_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fast reciprocal nearest neighbours between dense (H1, W1, D) and (H2, W2, D) maps.

    Args:
        desc1, desc2: descriptor maps (numpy arrays or torch tensors; CUDA tensors are
            searched on the GPU). Computations are float32; NN = argmax of the dot product,
            exact ties resolved to the smallest database flat index.
        subsample: seed grid step S; seeds are ``(S//2 + S*i, S//2 + S*j)`` inside image 1.
        seeds: explicit ``(x_array, y_array)`` seeds in image 1 (one walk iteration).
        pixel_tol: if > 0, a single iteration is made (from ``seeds``, or from the S-grid when
            ``seeds`` is None) and a seed is kept when its round trip ends closer than
            ``pixel_tol`` px (Euclidean) to it; the returned xy1 are the seeds themselves.
            If 0, a walk that returns to its pixel (or whose partner stops changing) is
            kept; with the S-grid up to 10 iterations are made and unconverged walks dropped.
        block_size: database rows per score tile (default: chosen per device).

    Returns:
        ``(xy1, xy2)`` (N, 2) int64 ``(x, y)`` arrays, unique pairs sorted by (flat index 1,
        flat index 2).
    """
    d1, d2 = _check_pair(desc1, desc2)
    if pixel_tol < 0:
        raise ValueError(f"pixel_tol must be >= 0, got {pixel_tol}")
    i1, i2 = _frm_flat(d1, d2, subsample, seeds, pixel_tol, block_size)
    return _flat_to_xy(i1, d1.shape[1]), _flat_to_xy(i2, d2.shape[1])


def mutual_nearest_neighbours(
    desc1: ArrayLike,
    desc2: ArrayLike,
    block_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force dense mutual nearest neighbours (reference / baseline).

    Every pixel of image 1 is matched to its dot-product NN in image 2 and back; pairs that
    are each other's NN are returned as (N, 2) int64 ``(x, y)`` arrays sorted by flat index 1.
    """
    d1, d2 = _check_pair(desc1, desc2)
    h1, w1, d = d1.shape
    h2, w2, _ = d2.shape
    empty = np.empty((0, 2), dtype=np.int64)
    if h1 * w1 == 0 or h2 * w2 == 0:
        return empty, empty.copy()
    pts1 = d1.reshape(-1, d)
    pts2 = d2.reshape(-1, d)
    nn12 = _TorchSearch(pts2, block_size).search(pts1).cpu().numpy()
    nn21 = _TorchSearch(pts1, block_size).search(pts2).cpu().numpy()
    idx1 = np.flatnonzero(nn21[nn12] == np.arange(h1 * w1))
    return _flat_to_xy(idx1, w1), _flat_to_xy(nn12[idx1], w2)
