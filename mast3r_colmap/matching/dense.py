"""The seam between descriptor producers and the matching code.

A *descriptor source* gives, for an image pair, one :class:`DenseView` per image: dense unit descriptors
at some working resolution, their confidence, and the exact map from working pixels to original-image
pixels. The MASt3R network is one source; the synthetic-scene oracle of the tests is another. Both feed
the very same correspondence extraction, keypoint consolidation, export and mapping code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Tuple

import numpy as np
import torch


@dataclass
class DenseView:
    """Dense descriptors of one image of a pair.

    Attributes:
        desc: (H, W, D) float32 unit-norm descriptors at the working resolution.
        conf: (H, W) float32 descriptor confidence (higher is better).
        to_original: maps (N, 2) float (x, y) working pixels to original-image pixels, both in hloc's
            convention ((0, 0) is the centre of the top-left pixel).
        original_size: (W, H) of the original image.
    """

    desc: torch.Tensor
    conf: torch.Tensor
    to_original: Callable[[np.ndarray], np.ndarray]
    original_size: Tuple[int, int]

    def __post_init__(self) -> None:
        if self.desc.dim() != 3:
            raise ValueError(f"desc must be (H, W, D), got {tuple(self.desc.shape)}")
        if tuple(self.conf.shape) != tuple(self.desc.shape[:2]):
            raise ValueError(f"conf {tuple(self.conf.shape)} does not match desc {tuple(self.desc.shape)}")

    @property
    def shape(self) -> Tuple[int, int]:
        """(H, W) of the working resolution."""
        return int(self.desc.shape[0]), int(self.desc.shape[1])


class DescriptorSource(Protocol):
    """Anything that describes image pairs densely."""

    def pair_views(self, name0: str, name1: str) -> Tuple[DenseView, DenseView]:
        """Dense views of both images of a pair (they may depend on the pair, as with MASt3R)."""
        ...
