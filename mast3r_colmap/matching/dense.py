"""The seam between what produces dense descriptors and the matcher.

A :class:`DenseNetwork` works in two steps, like MASt3R:

* ``encode`` turns a batch of equal-sized images (or crops) into one encoding per image; the matcher
  caches it under the key (image name, crop window or None) and reuses it for every pair of that image
  or window;
* ``decode`` turns two lists of encodings, the two sides of a batch of pairs, into per-view dense unit
  descriptors ``desc`` (B, H, W, D) and their confidence ``desc_conf`` (B, H, W) at the resolution of
  the encoded images: ``(view0, view1)``, or with ``symmetric`` both orders ``(res11, res21, res22,
  res12)`` (resXY: image X through head Y, as :meth:`~mast3r_colmap.model.mast3r.MASt3R.symmetric`);
* optionally, ``pointmap`` turns a list of encodings into the pointmap of each image decoded against itself
  (MASt3R's view-1 ``pts3d``, in that image's camera frame) and its confidence ``conf`` (the matcher's
  :meth:`~.matcher.Matcher.focal_priors` fits focal lengths to them, :mod:`mast3r_colmap.focal`).

Everything else (image loading, the encoding cache, scheduling, batching, fast reciprocal matching,
filters, coarse-to-fine crops and the map back to original pixels) belongs to the
:class:`~.matcher.Matcher` and is the same for every network. Two networks plug in here: the MASt3R
model (through :class:`MASt3RNetwork`) and the synthetic-scene oracle of the tests
(:class:`~mast3r_colmap.testing.synthetic.SyntheticNetwork`). The oracle describes a pixel by the 3D
point it sees, so ``encode`` also receives, per image, its cache key and the matcher's own map from
its pixels to original-image pixels (hloc convention: (0, 0) is the centre of the top-left pixel);
a real network ignores both.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from ..model.mast3r import Encoding, MASt3R

#: A crop window (left, top, right, bottom) in original-image pixels, half-open.
Window = Tuple[int, int, int, int]
#: What an encoding is cached under: (image name, crop window, or None for the whole network image).
Key = Tuple[str, Optional[Window]]
#: Maps (N, 2) float (x, y) pixels of an encoded image to original-image pixels (hloc convention).
PixelMap = Callable[[np.ndarray], np.ndarray]
#: Dense predictions of one view of a batch of pairs: ``desc`` (B, H, W, D), ``desc_conf`` (B, H, W);
#: or of a batch of images (:meth:`DenseNetwork.pointmap`): ``pts3d`` (B, H, W, 3), ``conf`` (B, H, W).
Dense = Dict[str, torch.Tensor]


class DenseNetwork(Protocol):
    """What the :class:`~.matcher.Matcher` asks for dense descriptors (see the module docstring)."""

    device: torch.device

    def settings(self) -> Dict[str, Any]:
        """Everything that determines the descriptors (with the matching settings, it keys stored matches)."""
        ...

    def encode(self, images: torch.Tensor, keys: Sequence[Key],
               to_original: Sequence[Optional[PixelMap]]) -> List[Any]:
        """One encoding per image of a (B, 3, H, W) batch in [-1, 1]; ``keys`` and ``to_original`` say
        which image or crop each one is and where its pixels lie in the original image."""
        ...

    def decode(self, enc0: Sequence[Any], enc1: Sequence[Any], symmetric: bool = False) -> Tuple[Dense, ...]:
        """Descriptors of the pairs ``(enc0[i], enc1[i])`` (each side of one image size)."""
        ...

    def pointmap(self, enc: Sequence[Any]) -> Dense:
        """Optional: ``pts3d`` (B, H, W, 3) of each image (of one size) in its own camera frame (x right, y
        down, z forward; any scale) and its confidence ``conf`` (B, H, W). A network without it gives no
        focal priors."""
        ...


class MASt3RNetwork:
    """The MASt3R model as a :class:`DenseNetwork` (descriptor-only decoding; the model's API is untouched)."""

    def __init__(self, model: MASt3R):
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.device

    def settings(self) -> Dict[str, Any]:
        """The weights (their digest, not the checkpoint path, which may be overwritten with new weights),
        the architecture and the precision."""
        return {"weights": self.model.weights_digest(), "model": repr(self.model.conf),
                "precision": str(self.model.amp_dtype or torch.float32)}

    def encode(self, images: torch.Tensor, keys: Sequence[Key],
               to_original: Sequence[Optional[PixelMap]]) -> List[Encoding]:
        enc = self.model.encode(images)  # the pixels say it all
        return [enc[i] for i in range(images.shape[0])]

    def decode(self, enc0: Sequence[Encoding], enc1: Sequence[Encoding], symmetric: bool = False) -> Tuple[Dense, ...]:
        e0, e1 = Encoding.cat(list(enc0)), Encoding.cat(list(enc1))
        if symmetric:
            return self.model.symmetric(e0, e1)
        return self.model.predict(e0, e1, with_pts3d=False)

    def pointmap(self, enc: Sequence[Encoding]) -> Dense:
        """View 1's ``pts3d`` and ``conf`` of each image paired with itself: ``predict(e, e, with_pts3d=True)``
        less the second view's head (whose DPT, at full resolution, costs as much as the first's)."""
        e = Encoding.cat(list(enc))
        tokens1, _ = self.model.decode(e, e, self.model.conf.dpt_hooks)
        pred1 = self.model._head(self.model.downstream_head1, e, tokens1, with_pts3d=True)
        return {"pts3d": pred1["pts3d"], "conf": pred1["conf"]}
