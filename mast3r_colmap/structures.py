"""Plain values handed from one pipeline stage to the next.

Coordinates are original-image pixels in hloc's convention: (0, 0) is the centre of the top-left pixel.
COLMAP puts the top-left image corner at (0, 0); the +0.5 is added only when writing a COLMAP database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

import numpy as np


def _points(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{name} must be an (N, 2) array of (x, y), got shape {a.shape}")
    return a


@dataclass
class PairMatches:
    """Raw correspondences of one image pair, in original-image pixels (hloc convention)."""

    name0: str
    name1: str
    xy0: np.ndarray                  # (N, 2) float64
    xy1: np.ndarray                  # (N, 2) float64
    scores: np.ndarray               # (N,) float32, higher is better

    def __post_init__(self) -> None:
        self.xy0 = _points(self.xy0, "xy0")
        self.xy1 = _points(self.xy1, "xy1")
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if not (len(self.xy0) == len(self.xy1) == len(self.scores)):
            raise ValueError(f"pair {self.name0}/{self.name1}: xy0, xy1 and scores differ in length "
                             f"({len(self.xy0)}, {len(self.xy1)}, {len(self.scores)})")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def pair(self) -> Tuple[str, str]:
        return self.name0, self.name1

    def swapped(self) -> "PairMatches":
        """The same correspondences seen from image 1."""
        return PairMatches(self.name1, self.name0, self.xy1, self.xy0, self.scores)


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
