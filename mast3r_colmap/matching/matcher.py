"""Pair matching with MASt3R: dense descriptors -> fast reciprocal matches -> original-image pixels.

Presets (hloc-style ``confs``):

* ``default``: one 512-px pass per pair (the official COLMAP-export mode: FRM in both directions,
  score = min of the two descriptor confidences, 3-px border filter, confidence >= 1.001);
* ``hires``: the same coarse pass, then coarse-to-fine: overlapping full-resolution crops of the
  training size are paired by a greedy cover of the coarse matches, matched in batches, and mapped
  back to full resolution (for images whose long side exceeds 512 px);
* ``sfm``: symmetric inference (both orders from one encoding) and MASt3R-SfM's score
  sqrt(q1 * q2).

Every image is encoded once and its encoding reused for all its pairs (and every crop once per
window), through :class:`EncodingCache`.

The descriptors come from a :class:`~.dense.DenseNetwork`: the MASt3R model, or the synthetic-scene
oracle of the tests; everything else (loading, caching, scheduling, batching, FRM, filters,
coarse-to-fine and the map back to original pixels) is this module's, the same for both.

Frames (see :mod:`~mast3r_colmap.images`): the network always sees the upright (EXIF-transposed) image,
and coarse-to-fine crops are cut from the upright full-resolution image; every match is mapped back to
the *stored* pixels of the file (``LoadedImage.to_original``, and ``upright_to_original`` for crops), the
frame in which COLMAP and hloc read the image. Matches lie on whole pixels of what the network saw, so each
:class:`~mast3r_colmap.structures.PairMatches` carries the lattice of each side
(:class:`~mast3r_colmap.structures.SamplingGrid`, the image of that pixel grid): the network pixels of a
single pass, the full-resolution pixels for coarse-to-fine (crops are cut at native resolution with integer
corners); keypoint consolidation puts keypoints exactly on it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar,
                    Union)

import numpy as np
import torch

from ..images import LoadedImage, load_image, load_original
from ..model.mast3r import MASt3R
from ..structures import PairMatches, SamplingGrid
from .coarse_to_fine import needs_coarse_to_fine, select_crop_pairs, training_resolution
from .dense import Dense, DenseNetwork, Key, MASt3RNetwork, PixelMap, Window
from .extract import Matches, border_mask, extract_correspondences_nonsym, extract_correspondences_symmetric

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class MatcherConfig:
    """Settings of pair matching (see the module docstring for the presets)."""

    image_size: int = 512            # network resolution (long side)
    mode: str = "nonsym"             # "nonsym" (COLMAP export) or "symmetric" (MASt3R-SfM)
    subsample: int = 8               # FRM seed grid step
    pixel_tol: float = 0             # FRM tolerance (0: iterate to convergence)
    border: int = 3                  # drop matches this close to the network-image border
    conf_threshold: float = 1.001    # keep matches with score >= this
    coarse_to_fine: bool = False
    crop_overlap: float = 0.5
    batch_size: int = 8              # pairs (or crop pairs) per decoder batch
    cache_size: int = 128            # encodings kept in memory (3 MiB each for ViT-L at 512x384)
    num_workers: int = 2             # threads decoding the images of upcoming pairs (0: decode inline)

    def __post_init__(self) -> None:
        if self.mode not in ("nonsym", "symmetric"):
            raise ValueError(f"unknown matching mode {self.mode!r}: use 'nonsym' or 'symmetric'")
        if self.image_size % 16 or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive multiple of 16, got {self.image_size}")
        if self.subsample < 1 or self.batch_size < 1:
            raise ValueError("subsample and batch_size must be >= 1")
        if self.cache_size < 1 or self.num_workers < 0:
            raise ValueError("cache_size must be >= 1 and num_workers >= 0")

    def replace(self, **changes: Any) -> "MatcherConfig":
        return dataclasses.replace(self, **changes)


confs: Dict[str, Dict[str, Any]] = {
    "default": {},
    "hires": {"coarse_to_fine": True},
    "sfm": {"mode": "symmetric", "conf_threshold": 0.0},
}


def get_config(preset: Union[str, MatcherConfig, Mapping[str, Any]] = "default", **overrides: Any) -> MatcherConfig:
    """A preset by name (or a config / dict of fields), with optional field overrides."""
    if isinstance(preset, MatcherConfig):
        base = preset
    elif isinstance(preset, str):
        if preset not in confs:
            raise ValueError(f"unknown matcher preset {preset!r}; available: {', '.join(confs)}")
        base = MatcherConfig(**confs[preset])
    else:
        base = MatcherConfig(**preset)
    return base.replace(**overrides) if overrides else base


# ---- dense views -> matches ---------------------------------------------------------------------

def _correspondences(preds: Tuple[Dense, ...], i: int, conf: MatcherConfig, symmetric: bool) -> Matches:
    """Correspondences (network pixels) of pair ``i`` of a decoded batch, border- and confidence-filtered:
    the COLMAP-export extraction of ``(view0, view1)``, or MASt3R-SfM's of both orders."""
    if symmetric:
        m = extract_correspondences_symmetric([r["desc"][i] for r in preds], [r["desc_conf"][i] for r in preds],
                                              subsample=conf.subsample)
        shape0, shape1 = preds[0]["desc"].shape[1:3], preds[2]["desc"].shape[1:3]
    else:
        p0, p1 = preds
        m = extract_correspondences_nonsym(p0["desc"][i], p1["desc"][i], p0["desc_conf"][i], p1["desc_conf"][i],
                                           subsample=conf.subsample, pixel_tol=conf.pixel_tol)
        shape0, shape1 = p0["desc"].shape[1:3], p1["desc"].shape[1:3]
    keep = border_mask(m.xy1, m.xy2, tuple(shape0), tuple(shape1), conf.border) & (m.conf >= conf.conf_threshold)
    return m.select(keep)


def _crop_to_original(window: Window, image: LoadedImage) -> PixelMap:
    """Crop pixels -> original (stored-frame) pixels: a crop is cut from the upright image at full
    resolution, so shift by its corner, then undo the EXIF orientation."""
    offset = np.array(window[:2], np.float64)
    return lambda xy: image.upright_to_original(np.asarray(xy, np.float64) + offset)


def _match_settings(conf: MatcherConfig) -> Dict[str, Any]:
    """The fields that change the matches (not batch or cache sizes)."""
    out = dataclasses.asdict(conf)
    for key in ("batch_size", "cache_size", "num_workers"):
        out.pop(key)
    return out


# ---- encodings ----------------------------------------------------------------------------------

def _lookup(keys: Sequence[Key], values: Union[Sequence[T], Callable[[Key], T]]) -> Callable[[Key], T]:
    """The value of a key: ``values`` itself if it is a function of the key, else the one at its position."""
    return values if callable(values) else dict(zip(keys, values)).__getitem__


class EncodingCache:
    """LRU cache of network encodings keyed by (image name, crop window or None)."""

    def __init__(self, network: DenseNetwork, max_items: int = 64):
        self.network = network
        self.max_items = max_items
        self._items: "OrderedDict[Key, Any]" = OrderedDict()
        self.hits = self.misses = 0

    def get_many(self, keys: Sequence[Key], images: Union[Sequence[torch.Tensor], Callable[[Key], torch.Tensor]],
                 to_original: Union[Sequence[PixelMap], Callable[[Key], PixelMap], None] = None) -> List[Any]:
        """Encodings for ``keys``; images of missing keys are encoded in batches of equal size.

        ``images`` are the (1, 3, H, W) images of the keys, or a function of the key that returns
        one (called only for the keys that miss); ``to_original`` their maps to original pixels, in
        the same forms (None: for a network that needs only the pixels, such as MASt3R).
        """
        image_of = _lookup(keys, images)
        map_of = _lookup(keys, to_original) if to_original is not None else (lambda key: None)
        missing: Dict[Key, torch.Tensor] = {}
        for key in keys:
            if key in self._items or key in missing:
                if key in self._items:
                    self._items.move_to_end(key)
                self.hits += 1
            else:
                missing[key] = image_of(key)
                self.misses += 1
        by_shape: Dict[Tuple[int, int], List[Key]] = {}
        for key, img in missing.items():
            by_shape.setdefault(tuple(img.shape[-2:]), []).append(key)
        new: Dict[Key, Any] = {}
        for group in by_shape.values():
            batch = torch.cat([missing[k] for k in group]).to(self.network.device)
            new.update(zip(group, self.network.encode(batch, group, [map_of(k) for k in group])))
        out = [self._items[k] if k in self._items else new[k] for k in keys]
        self._items.update(new)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return out


# ---- the matcher --------------------------------------------------------------------------------

ImageLike = Union[str, os.PathLike, LoadedImage]


class Matcher:
    """Pair matcher over a :class:`~.dense.DenseNetwork` (or a MASt3R model) with an encoding cache,
    batching and the presets of :data:`confs`."""

    def __init__(self, network: Union[DenseNetwork, MASt3R],
                 conf: Union[str, MatcherConfig, Mapping[str, Any]] = "default",
                 image_dir: Optional[Union[str, os.PathLike]] = None, checkpoint: str = ""):
        self.network: DenseNetwork = MASt3RNetwork(network) if isinstance(network, MASt3R) else network
        self.checkpoint = checkpoint  # where the weights came from (settings() keys their digest)
        self.conf = get_config(conf)
        self.image_dir = image_dir
        self.encodings = EncodingCache(self.network, self.conf.cache_size)
        self._images: "OrderedDict[str, LoadedImage]" = OrderedDict()
        self._prefetched: Dict[str, "Future[LoadedImage]"] = {}

    @property
    def cache_size(self) -> int:
        """Encodings kept in memory (the pipeline orders pairs for it, see :mod:`.schedule`)."""
        return self.conf.cache_size

    def settings(self) -> Dict[str, Any]:
        """What determines the matches: the network's settings (for MASt3R: the weights digest,
        architecture and precision) and the matching settings."""
        return {**self.network.settings(), **_match_settings(self.conf)}

    @torch.inference_mode()
    def global_descriptors(self, names: Sequence[str]) -> np.ndarray:
        """(N, C) retrieval descriptors pooled from the MASt3R encoder tokens (encodings stay cached)."""
        from ..model.pooling import global_descriptor_from_tokens

        if not isinstance(self.network, MASt3RNetwork):
            raise TypeError(f"global descriptors need the MASt3R encoder, not {type(self.network).__name__}")
        out = []
        for image in self.images(names):
            enc = self.encodings.get_many([(image.name, None)], [image.img], [image.to_original])[0]
            out.append(global_descriptor_from_tokens(enc.tokens[0].float()).cpu().numpy())
        return np.stack(out)

    @torch.inference_mode()
    def focal_priors(self, names: Sequence[ImageLike]) -> Dict[str, float]:
        """``{name: focal length}`` in original-image pixels, from the network's pointmap of each image.

        Each image is decoded against itself (its encoding comes from, and stays in, the encoding cache;
        images of one size in batches of ``conf.batch_size``); :func:`~mast3r_colmap.focal.estimate_focal`
        fits the focal at network resolution, with the principal point at the centre of the original image,
        and the resize factor (upright / resized, the mean of the two axes) turns it into original pixels
        (the EXIF orientation turns the image, not the focal). Images whose fit fails or gives a focal
        outside :data:`~mast3r_colmap.focal.PLAUSIBLE_FOCAL_FACTORS` of the long side are left out, with a
        warning; a network without ``pointmap`` gives ``{}``.
        """
        from ..focal import PLAUSIBLE_FOCAL_FACTORS, estimate_focal

        if getattr(self.network, "pointmap", None) is None:
            logger.info("%s gives no pointmaps: no focal priors", type(self.network).__name__)
            return {}
        out: Dict[str, float] = {}
        pending: List[LoadedImage] = []

        def flush() -> None:
            keys = [(im.name, None) for im in pending]
            encodings = self.encodings.get_many(keys, [im.img for im in pending], [im.to_original for im in pending])
            pred = self.network.pointmap(encodings)
            for i, im in enumerate(pending):
                w, h = im.original_size
                centre = im.to_network(np.array([[(w - 1) / 2, (h - 1) / 2]]))[0]
                try:
                    f = estimate_focal(pred["pts3d"][i].float().cpu().numpy(), pred["conf"][i].float().cpu().numpy(),
                                       principal_point=(float(centre[0]), float(centre[1]))) * float(np.mean(im.scale))
                except ValueError as exc:
                    logger.warning("%s: no focal prior: %s", im.name, exc)
                    continue
                low, high = (factor * max(w, h) for factor in PLAUSIBLE_FOCAL_FACTORS)
                if not low <= f <= high:
                    logger.warning("%s: no focal prior: the pointmap gives %.1f px, outside %.0f..%.0f px for a "
                                   "%dx%d image", im.name, f, low, high, w, h)
                    continue
                out[im.name] = f
                logger.debug("%s: focal prior %.2f px (%dx%d)", im.name, f, w, h)
            pending.clear()

        for image in self.images(names):
            if pending and image.img.shape != pending[0].img.shape:
                flush()
            pending.append(image)
            if len(pending) >= self.conf.batch_size:
                flush()
        if pending:
            flush()
        return out

    # images
    def image(self, image: ImageLike) -> LoadedImage:
        """Load (or fetch from the cache) the network-size image.

        The image cache is an LRU as large as the encoding cache (2.3 MiB per 512x384 image), so an
        image whose encoding is cached is not decoded again either.
        """
        if isinstance(image, LoadedImage):
            return image
        name = os.fspath(image)
        if name in self._images:
            self._images.move_to_end(name)
            return self._images[name]
        future = self._prefetched.pop(name, None)
        loaded = future.result() if future is not None else self._load(name)
        self._images[name] = loaded
        while len(self._images) > max(self.conf.cache_size, 2 * self.conf.batch_size):
            self._images.popitem(last=False)
        return loaded

    def _load(self, name: str) -> LoadedImage:
        path = os.path.join(self.image_dir, name) if self.image_dir is not None else name
        return load_image(path, self.conf.image_size, name=name)

    def images(self, names: Iterable[ImageLike]) -> Iterator[LoadedImage]:
        """:meth:`image` of each name in turn, the next ones decoded in the background."""
        for name in self._prefetching(names, lambda name: (name,)):
            yield self.image(name)

    def _prefetching(self, items: Iterable[T], images_of: Callable[[T], Sequence[ImageLike]]) -> Iterator[T]:
        """Yield ``items`` in order while ``conf.num_workers`` threads decode the images of the next
        ``2 * batch_size`` items that are not cached (an unreadable image raises when it is reached)."""
        if not self.conf.num_workers:
            yield from items
            return
        upcoming: "deque[T]" = deque()
        source = iter(items)
        pool = ThreadPoolExecutor(self.conf.num_workers, "mast3r-load")
        try:
            while True:
                for item in itertools.islice(source, 2 * self.conf.batch_size + 1 - len(upcoming)):
                    upcoming.append(item)
                    for image in images_of(item):
                        if isinstance(image, LoadedImage):
                            continue
                        name = os.fspath(image)
                        if name not in self._images and name not in self._prefetched:
                            self._prefetched[name] = pool.submit(self._load, name)
                if not upcoming:
                    return
                yield upcoming.popleft()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._prefetched.clear()

    # descriptors
    @torch.inference_mode()
    def _decode(self, keys0: Sequence[Key], keys1: Sequence[Key], images: Callable[[Key], torch.Tensor],
                to_original: Callable[[Key], PixelMap], symmetric: bool) -> Tuple[Dense, ...]:
        """Descriptors of the pairs (keys0[i], keys1[i]), each side of one size, through the encoding cache."""
        enc0 = self.encodings.get_many(keys0, images, to_original)
        enc1 = self.encodings.get_many(keys1, images, to_original)
        return self.network.decode(enc0, enc1, symmetric)

    def _coarse(self, batch: List[Tuple[LoadedImage, LoadedImage]]) -> List[PairMatches]:
        loaded = {(im.name, None): im for pair in batch for im in pair}
        symmetric = self.conf.mode == "symmetric"
        preds = self._decode([(a.name, None) for a, _ in batch], [(b.name, None) for _, b in batch],
                             lambda key: loaded[key].img, lambda key: loaded[key].to_original, symmetric)
        out = []
        for i, (im0, im1) in enumerate(batch):
            m = _correspondences(preds, i, self.conf, symmetric)
            out.append(PairMatches(im0.name, im1.name, im0.to_original(m.xy1), im1.to_original(m.xy2), m.conf,
                                   SamplingGrid.from_map(im0.to_original), SamplingGrid.from_map(im1.to_original)))
        return out

    def match_pairs(self, pairs: Iterable[Tuple[ImageLike, ImageLike]]) -> Iterator[PairMatches]:
        """Match pairs in order; consecutive pairs of equal shapes share a decoder batch.

        Each image is encoded once while its encoding stays in the LRU cache (``conf.cache_size``
        images); for long pair lists, :func:`~.schedule.schedule_pairs` gives an order that keeps it there.
        With ``conf.num_workers`` > 0, the images of the next ``2 * batch_size`` pairs are decoded by
        background threads while the network runs.
        """
        pending: List[Tuple[LoadedImage, LoadedImage]] = []

        def flush() -> Iterator[PairMatches]:
            if not pending:
                return
            for pm, (im0, im1) in zip(self._coarse(pending), pending):
                yield self._refine(pm, im0, im1) if self.conf.coarse_to_fine else pm
            pending.clear()

        for a, b in self._prefetching(pairs, lambda pair: pair):
            try:
                im0, im1 = self.image(a), self.image(b)
            except Exception:
                yield from flush()  # the pairs before an unreadable image are still delivered
                raise
            key = (tuple(im0.img.shape), tuple(im1.img.shape))
            if pending and key != (tuple(pending[0][0].img.shape), tuple(pending[0][1].img.shape)):
                yield from flush()
            pending.append((im0, im1))
            if len(pending) >= self.conf.batch_size:
                yield from flush()
        yield from flush()

    def match_pair(self, image0: ImageLike, image1: ImageLike) -> PairMatches:
        """Match one pair (see :func:`match_pair`)."""
        return next(self.match_pairs([(image0, image1)]))

    # coarse-to-fine
    def _refine(self, coarse: PairMatches, im0: LoadedImage, im1: LoadedImage) -> PairMatches:
        (w0, h0), (w1, h1) = im0.upright_size, im1.upright_size  # crops are cut upright
        maxdim = self.conf.image_size
        if not (needs_coarse_to_fine(h0, w0, maxdim) or needs_coarse_to_fine(h1, w1, maxdim)):
            return coarse
        crops = select_crop_pairs((h0, w0), (h1, w1), im0.original_to_upright(coarse.xy0),
                                  im1.original_to_upright(coarse.xy1), maxdim=maxdim,
                                  overlap=self.conf.crop_overlap,
                                  forced_resolution=(_crop_size(h0, w0, maxdim), _crop_size(h1, w1, maxdim)))
        if not crops:
            logger.debug("%s/%s: no crop pair covers the coarse matches, keeping them", im0.name, im1.name)
            return coarse
        originals = _LazyOriginals({im0.name: im0.path, im1.name: im1.path})
        parts: List[PairMatches] = []
        for start in range(0, len(crops), self.conf.batch_size):
            chunk = crops[start:start + self.conf.batch_size]
            parts.extend(self._match_crops(im0, im1, originals, chunk))
        xy0, xy1, scores = _unique_best(np.concatenate([p.xy0 for p in parts]),
                                        np.concatenate([p.xy1 for p in parts]),
                                        np.concatenate([p.scores for p in parts]))
        logger.debug("%s/%s: %d coarse -> %d fine matches from %d crop pairs",
                     im0.name, im1.name, len(coarse), len(scores), len(crops))
        return PairMatches(im0.name, im1.name, xy0, xy1, scores,
                           _common_grid([p.grid0 for p in parts]), _common_grid([p.grid1 for p in parts]))

    def _match_crops(self, im0: LoadedImage, im1: LoadedImage, originals: "_LazyOriginals",
                     crops: Sequence[Tuple[Window, Window]]) -> List[PairMatches]:
        name0, name1 = im0.name, im1.name
        images = {name0: im0, name1: im1}

        def cut(key: Key) -> torch.Tensor:  # only called for crops whose encoding misses
            name, (l, t, r, b) = key
            return originals[name][..., t:b, l:r]

        groups: Dict[Tuple, List[int]] = {}
        for i, (w0, w1) in enumerate(crops):  # crops of equal sizes share a decoder batch
            groups.setdefault(((w0[3] - w0[1], w0[2] - w0[0]), (w1[3] - w1[1], w1[2] - w1[0])), []).append(i)
        results: Dict[int, PairMatches] = {}
        for idx in groups.values():
            preds = self._decode([(name0, crops[i][0]) for i in idx], [(name1, crops[i][1]) for i in idx], cut,
                                 lambda key: _crop_to_original(key[1], images[key[0]]), symmetric=False)
            for j, i in enumerate(idx):
                m = _correspondences(preds, j, self.conf, symmetric=False)
                map0, map1 = _crop_to_original(crops[i][0], im0), _crop_to_original(crops[i][1], im1)
                results[i] = PairMatches(name0, name1, map0(m.xy1), map1(m.xy2), m.conf,
                                         SamplingGrid.from_map(map0), SamplingGrid.from_map(map1))
        return [results[i] for i in range(len(crops))]


class _LazyOriginals:
    """Full-resolution upright images by name, decoded on first use (coarse-to-fine needs them only for the
    crops whose encodings are not cached)."""

    def __init__(self, paths: Mapping[str, str]):
        self.paths = paths
        self._loaded: Dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._loaded:
            self._loaded[name] = load_original(self.paths[name])
        return self._loaded[name]


def _crop_size(height: int, width: int, maxdim: int, patch: int = 16) -> Tuple[int, int]:
    """Crop (H, W) for coarse-to-fine: the training resolution of the image's aspect class, clipped to
    the image and rounded down to the patch size (a small image is then cropped, not resized)."""
    h, w = training_resolution(height, width, maxdim)
    return min(h, height - height % patch), min(w, width - width % patch)


def _common_grid(grids: Sequence[Optional[SamplingGrid]]) -> Optional[SamplingGrid]:
    """The grid of matches pooled from several crops: theirs when they all have the same (the full-resolution
    pixels, as crops are cut at native resolution with integer corners), else None."""
    first = grids[0] if grids else None
    if first is None or any(g is None or not first.same_lattice(g) for g in grids[1:]):
        return None
    return first


def _unique_best(xy0: np.ndarray, xy1: np.ndarray, scores: np.ndarray):
    """Drop repeated (xy0, xy1) rows, keeping the highest score (deterministic order)."""
    if len(scores) == 0:
        return xy0, xy1, scores
    order = np.lexsort((-scores, xy1[:, 1], xy1[:, 0], xy0[:, 1], xy0[:, 0]))
    keys = np.concatenate([xy0, xy1], axis=1)[order]
    first = np.ones(len(order), bool)
    first[1:] = np.any(keys[1:] != keys[:-1], axis=1)
    keep = order[first]
    return xy0[keep], xy1[keep], scores[keep]


def match_pair(network: Union[DenseNetwork, MASt3R], image0: ImageLike, image1: ImageLike,
               conf: Union[str, MatcherConfig, Mapping[str, Any]] = "default") -> PairMatches:
    """Match two images (paths or :class:`LoadedImage`) with a preset; matches are in original-image
    pixels (hloc convention: (0, 0) is the centre of the top-left pixel), with scores."""
    return Matcher(network, conf).match_pair(image0, image1)
