"""Plain values handed from one pipeline stage to the next.

Coordinates are original-image pixels in hloc's convention: (0, 0) is the centre of the top-left pixel.
COLMAP puts the top-left image corner at (0, 0); the +0.5 is added only when writing a COLMAP database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import numpy as np


def _points(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{name} must be an (N, 2) array of (x, y), got shape {a.shape}")
    return a


@dataclass(frozen=True)
class SamplingGrid:
    """The axis-aligned lattice ``{(ox + i * sx, oy + j * sy)}`` (i, j integers) of original-image pixels
    (hloc convention) on which a matcher sampled an image: the network pixels of a single pass, the
    full-resolution pixels of coarse-to-fine crops. Keypoint consolidation puts one keypoint on each
    lattice point that is observed (see :mod:`~mast3r_colmap.keypoints`)."""

    ox: float
    oy: float
    sx: float                        # > 0
    sy: float                        # > 0

    def __post_init__(self) -> None:
        values = tuple(float(v) for v in (self.ox, self.oy, self.sx, self.sy))
        if not all(math.isfinite(v) for v in values) or values[2] <= 0 or values[3] <= 0:
            raise ValueError(f"a sampling grid needs a finite origin and positive finite steps, got {values}")
        for name, value in zip(("ox", "oy", "sx", "sy"), values):
            object.__setattr__(self, name, value)

    @classmethod
    def from_map(cls, to_original: Callable[[np.ndarray], np.ndarray]) -> "SamplingGrid":
        """The image of the integer pixel lattice under an axis-aligned affine map to original pixels (e.g.
        ``LoadedImage.to_original``: resize, crop and EXIF orientation, which may swap or flip the axes).

        Steps are made positive and the origin is the lattice point in ``[0, sx) x [0, sy)``, so maps
        onto the same lattice give equal grids (up to rounding).
        """
        p00, p10, p01 = np.asarray(to_original(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])), np.float64)
        u, v = p10 - p00, p01 - p00
        if abs(u[0]) < abs(u[1]):                        # the map swaps the axes
            u, v = v, u
        if not (abs(u[1]) <= 1e-9 * abs(u[0]) and abs(v[0]) <= 1e-9 * abs(v[1])) or u[0] == 0 or v[1] == 0:
            raise ValueError(f"the pixel map is not axis-aligned: (1, 0) -> {p10 - p00}, (0, 1) -> {p01 - p00}")
        sx, sy = abs(float(u[0])), abs(float(v[1]))
        return cls(_reduce(float(p00[0]), sx), _reduce(float(p00[1]), sy), sx, sy)

    def same_lattice(self, other: "SamplingGrid", rtol: float = 1e-9) -> bool:
        """Whether both describe the same lattice (steps equal and origins a whole number of steps apart,
        within ``rtol`` relative to the step and the size of the coordinates)."""
        for o0, s0, o1, s1 in ((self.ox, self.sx, other.ox, other.sx), (self.oy, self.sy, other.oy, other.sy)):
            if abs(s0 - s1) > rtol * max(s0, s1):
                return False
            d = o1 - o0
            if abs(d - round(d / s0) * s0) > rtol * max(s0, abs(o0), abs(o1)):
                return False
        return True


def _reduce(origin: float, step: float) -> float:
    """The lattice point ``origin + k * step`` in [0, step)."""
    r = origin - math.floor(origin / step) * step + 0.0  # + 0.0: no -0.0
    return r if 0.0 <= r < step else 0.0               # rounding may land a hair outside


def _grid(g: object, name: str) -> Optional[SamplingGrid]:
    if g is not None and not isinstance(g, SamplingGrid):
        raise ValueError(f"{name} must be a SamplingGrid or None, got {type(g).__name__}")
    return g


@dataclass
class PairMatches:
    """Raw correspondences of one image pair, in original-image pixels (hloc convention).

    ``grid0`` / ``grid1``: the lattice each side was sampled on (:class:`SamplingGrid`), or None for
    matches of arbitrary positions. Keypoint consolidation uses them to place keypoints exactly.
    """

    name0: str
    name1: str
    xy0: np.ndarray                  # (N, 2) float64
    xy1: np.ndarray                  # (N, 2) float64
    scores: np.ndarray               # (N,) float32, higher is better
    grid0: Optional[SamplingGrid] = None
    grid1: Optional[SamplingGrid] = None

    def __post_init__(self) -> None:
        self.xy0 = _points(self.xy0, "xy0")
        self.xy1 = _points(self.xy1, "xy1")
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if not (len(self.xy0) == len(self.xy1) == len(self.scores)):
            raise ValueError(f"pair {self.name0}/{self.name1}: xy0, xy1 and scores differ in length "
                             f"({len(self.xy0)}, {len(self.xy1)}, {len(self.scores)})")
        self.grid0 = _grid(self.grid0, "grid0")
        self.grid1 = _grid(self.grid1, "grid1")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def pair(self) -> Tuple[str, str]:
        return self.name0, self.name1

    def swapped(self) -> "PairMatches":
        """The same correspondences seen from image 1."""
        return PairMatches(self.name1, self.name0, self.xy1, self.xy0, self.scores, self.grid1, self.grid0)


@dataclass
class ImageKeypoints:
    """Per-image keypoints shared by all pairs of that image."""

    name: str
    keypoints: np.ndarray            # (K, 2) float64, hloc convention
    scores: np.ndarray = field(default=None)  # type: ignore[assignment]  # (K,) float32 votes

    def __post_init__(self) -> None:
        self.keypoints = _points(self.keypoints, "keypoints")
        if self.scores is None:
            self.scores = np.ones(len(self.keypoints), np.float32)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if len(self.scores) != len(self.keypoints):
            raise ValueError(f"{self.name}: {len(self.keypoints)} keypoints but {len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.keypoints)


@dataclass
class IndexMatches:
    """Matches of one pair as keypoint indices into the two images' :class:`ImageKeypoints`."""

    name0: str
    name1: str
    matches: np.ndarray              # (M, 2) int64 [idx0, idx1], one-to-one
    scores: np.ndarray               # (M,) float32

    def __post_init__(self) -> None:
        self.matches = np.asarray(self.matches, dtype=np.int64).reshape(-1, 2)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if len(self.matches) != len(self.scores):
            raise ValueError(f"pair {self.name0}/{self.name1}: {len(self.matches)} matches but "
                             f"{len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.matches)

    @property
    def pair(self) -> Tuple[str, str]:
        return self.name0, self.name1
