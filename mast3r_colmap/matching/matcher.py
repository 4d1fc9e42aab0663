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
"""

from __future__ import annotations

import argparse
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
from ..model.mast3r import Encoding, MASt3R
from ..structures import PairMatches
from .coarse_to_fine import needs_coarse_to_fine, select_crop_pairs, training_resolution
from .dense import DenseView, DescriptorSource
from .extract import (Matches, border_mask, extract_correspondences_nonsym,
                      extract_correspondences_symmetric)

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


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The matcher's resource flags, shared by the command-line tools (see :func:`cli_overrides`)."""
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per decoder batch (default 8)")
    parser.add_argument("--cache-size", type=int, default=None,
                        help="image encodings kept in memory (default 128; 3 MiB each for ViT-L at 512x384)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="threads decoding the images of upcoming pairs (default 2; 0: decode inline)")


def cli_overrides(args: argparse.Namespace) -> Dict[str, int]:
    """The :class:`MatcherConfig` fields set by :func:`add_cli_arguments` flags."""
    return {key: getattr(args, key) for key in ("batch_size", "cache_size", "num_workers")
            if getattr(args, key, None) is not None}


# ---- dense views -> matches ---------------------------------------------------------------------

def _filter(m: Matches, shape0: Tuple[int, int], shape1: Tuple[int, int], conf: MatcherConfig) -> Matches:
    keep = border_mask(m.xy1, m.xy2, shape0, shape1, conf.border) & (m.conf >= conf.conf_threshold)
    return m.select(keep)


def _extract_nonsym(desc0: torch.Tensor, desc1: torch.Tensor, conf0: torch.Tensor, conf1: torch.Tensor,
                    conf: MatcherConfig) -> Matches:
    """COLMAP-export correspondences of two dense maps, border- and confidence-filtered."""
    m = extract_correspondences_nonsym(desc0, desc1, conf0, conf1, subsample=conf.subsample,
                                       pixel_tol=conf.pixel_tol)
    return _filter(m, tuple(desc0.shape[:2]), tuple(desc1.shape[:2]), conf)


def match_views(view0: DenseView, view1: DenseView, conf: MatcherConfig = MatcherConfig(),
                names: Tuple[str, str] = ("image0", "image1")) -> PairMatches:
    """Correspondences of two dense views (COLMAP-export mode), in original-image pixels."""
    m = _extract_nonsym(view0.desc, view1.desc, view0.conf, view1.conf, conf)
    return PairMatches(names[0], names[1], view0.to_original(m.xy1.astype(np.float64)),
                       view1.to_original(m.xy2.astype(np.float64)), m.conf)


def match_pairs_with_source(source: DescriptorSource, pairs: Iterable[Tuple[str, str]],
                            conf: MatcherConfig = MatcherConfig()) -> Iterator[PairMatches]:
    """Match pairs with any :class:`DescriptorSource` (the network, or the synthetic oracle of the tests)."""
    for name0, name1 in pairs:
        view0, view1 = source.pair_views(name0, name1)
        yield match_views(view0, view1, conf, (name0, name1))


class SourceMatcher:
    """A pipeline matcher over any :class:`DescriptorSource` (e.g. the synthetic oracle of the tests)."""

    def __init__(self, source: DescriptorSource, conf: Union[str, MatcherConfig, Mapping[str, Any]] = "default",
                 name: str = "source"):
        self.source = source
        self.conf = get_config(conf)
        self.name = name

    def settings(self) -> Dict[str, Any]:
        return {"source": self.name, **_match_settings(self.conf)}

    def match_pairs(self, pairs: Iterable[Tuple[str, str]]) -> Iterator[PairMatches]:
        return match_pairs_with_source(self.source, pairs, self.conf)


def _match_settings(conf: MatcherConfig) -> Dict[str, Any]:
    """The fields that change the matches (not batch or cache sizes)."""
    out = dataclasses.asdict(conf)
    for key in ("batch_size", "cache_size", "num_workers"):
        out.pop(key)
    return out


# ---- encodings ----------------------------------------------------------------------------------

class EncodingCache:
    """LRU cache of encoder outputs keyed by (image name, crop window or None)."""

    def __init__(self, model: MASt3R, max_items: int = 64):
        self.model = model
        self.max_items = max_items
        self._items: "OrderedDict[Any, Encoding]" = OrderedDict()
        self.hits = self.misses = 0

    def get_many(self, keys: Sequence[Any],
                 images: Union[Sequence[torch.Tensor], Callable[[Any], torch.Tensor]]) -> List[Encoding]:
        """Encodings for ``keys``; images of missing keys are encoded in batches of equal size.

        ``images`` are the (1, 3, H, W) images of the keys, or a function of the key that returns
        one (called only for the keys that miss).
        """
        image_of = images if callable(images) else dict(zip(keys, images)).__getitem__
        missing: Dict[Any, torch.Tensor] = {}
        for key in keys:
            if key in self._items or key in missing:
                if key in self._items:
                    self._items.move_to_end(key)
                self.hits += 1
            else:
                missing[key] = image_of(key)
                self.misses += 1
        by_shape: Dict[Tuple[int, int], List[Any]] = {}
        for key, img in missing.items():
            by_shape.setdefault(tuple(img.shape[-2:]), []).append(key)
        new: Dict[Any, Encoding] = {}
        for group in by_shape.values():
            batch = torch.cat([missing[k] for k in group]).to(self.model.device)
            enc = self.model.encode(batch)
            for i, key in enumerate(group):
                new[key] = enc[i]
        out = [self._items.get(k) or new[k] for k in keys]
        for key, enc in new.items():
            self._items[key] = enc
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return out


# ---- the MASt3R matcher -------------------------------------------------------------------------

ImageLike = Union[str, os.PathLike, LoadedImage]


class Matcher:
    """MASt3R pair matcher with an encoding cache, batching and the presets of :data:`confs`."""

    def __init__(self, model: MASt3R, conf: Union[str, MatcherConfig, Mapping[str, Any]] = "default",
                 image_dir: Optional[Union[str, os.PathLike]] = None, checkpoint: str = ""):
        self.model = model
        self.checkpoint = checkpoint  # where the weights came from (settings() keys their digest)
        self.conf = get_config(conf)
        self.image_dir = image_dir
        self.encodings = EncodingCache(model, self.conf.cache_size)
        self._images: "OrderedDict[str, LoadedImage]" = OrderedDict()
        self._prefetched: Dict[str, "Future[LoadedImage]"] = {}

    @property
    def cache_size(self) -> int:
        """Encodings kept in memory (the pipeline orders pairs for it, see :mod:`.schedule`)."""
        return self.conf.cache_size

    def settings(self) -> Dict[str, Any]:
        """What determines the matches: the weights (their digest, not the checkpoint path, which may
        be overwritten with new weights), architecture, precision and matching settings."""
        return {"weights": self.model.weights_digest(), "model": repr(self.model.conf),
                "precision": str(self.model.amp_dtype or torch.float32), **_match_settings(self.conf)}

    @torch.inference_mode()
    def global_descriptors(self, names: Sequence[str]) -> np.ndarray:
        """(N, C) retrieval descriptors pooled from the encoder tokens (encodings stay cached)."""
        from ..model.pooling import global_descriptor_from_tokens

        out = []
        for image in self.images(names):
            enc = self.encodings.get_many([(image.name, None)], [image.img])[0]
            out.append(global_descriptor_from_tokens(enc.tokens[0].float()).cpu().numpy())
        return np.stack(out)

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
    def _describe(self, images0: List[LoadedImage], images1: List[LoadedImage]):
        """Descriptor-only predictions for a batch of pairs of equal shapes."""
        enc0 = self.encodings.get_many([(im.name, None) for im in images0], [im.img for im in images0])
        enc1 = self.encodings.get_many([(im.name, None) for im in images1], [im.img for im in images1])
        e0, e1 = Encoding.cat(enc0), Encoding.cat(enc1)
        if self.conf.mode == "symmetric":
            return self.model.symmetric(e0, e1)
        return self.model.predict(e0, e1, with_pts3d=False)

    def _coarse(self, batch: List[Tuple[LoadedImage, LoadedImage]]) -> List[PairMatches]:
        preds = self._describe([a for a, _ in batch], [b for _, b in batch])
        out = []
        for i, (im0, im1) in enumerate(batch):
            if self.conf.mode == "symmetric":
                m = extract_correspondences_symmetric([r["desc"][i] for r in preds],
                                                      [r["desc_conf"][i] for r in preds],
                                                      subsample=self.conf.subsample)
                m = _filter(m, tuple(im0.true_shape[0].tolist()), tuple(im1.true_shape[0].tolist()), self.conf)
            else:
                p0, p1 = preds
                m = _extract_nonsym(p0["desc"][i], p1["desc"][i], p0["desc_conf"][i], p1["desc_conf"][i], self.conf)
            out.append(PairMatches(im0.name, im1.name, im0.to_original(m.xy1.astype(np.float64)),
                                   im1.to_original(m.xy2.astype(np.float64)), m.conf))
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
        (w0, h0), (w1, h1) = im0.original_size, im1.original_size
        maxdim = self.conf.image_size
        if not (needs_coarse_to_fine(h0, w0, maxdim) or needs_coarse_to_fine(h1, w1, maxdim)):
            return coarse
        crops = select_crop_pairs((h0, w0), (h1, w1), coarse.xy0, coarse.xy1, maxdim=maxdim,
                                  overlap=self.conf.crop_overlap,
                                  forced_resolution=(_crop_size(h0, w0, maxdim), _crop_size(h1, w1, maxdim)))
        if not crops:
            logger.debug("%s/%s: no crop pair covers the coarse matches, keeping them", im0.name, im1.name)
            return coarse
        originals = _LazyOriginals({im0.name: im0.path, im1.name: im1.path})
        parts: List[Matches] = []
        for start in range(0, len(crops), self.conf.batch_size):
            chunk = crops[start:start + self.conf.batch_size]
            parts.extend(self._match_crops(im0.name, im1.name, originals, chunk))
        xy0 = np.concatenate([p.xy1 for p in parts]).astype(np.float64)
        xy1 = np.concatenate([p.xy2 for p in parts]).astype(np.float64)
        scores = np.concatenate([p.conf for p in parts])
        xy0, xy1, scores = _unique_best(xy0, xy1, scores)
        logger.debug("%s/%s: %d coarse -> %d fine matches from %d crop pairs",
                     im0.name, im1.name, len(coarse), len(scores), len(crops))
        return PairMatches(im0.name, im1.name, xy0, xy1, scores)

    @torch.inference_mode()
    def _match_crops(self, name0: str, name1: str, originals: "_LazyOriginals",
                     crops: Sequence[Tuple[Tuple[int, ...], Tuple[int, ...]]]) -> List[Matches]:
        def cut(key):  # key = (image name, (l, t, r, b)); only called for crops whose encoding misses
            name, (l, t, r, b) = key
            return originals[name][..., t:b, l:r]

        groups: Dict[Tuple, List[int]] = {}
        for i, (w0, w1) in enumerate(crops):  # crops of equal sizes share a decoder batch
            groups.setdefault(((w0[3] - w0[1], w0[2] - w0[0]), (w1[3] - w1[1], w1[2] - w1[0])), []).append(i)
        results: Dict[int, Matches] = {}
        for idx in groups.values():
            enc0 = self.encodings.get_many([(name0, crops[i][0]) for i in idx], cut)
            enc1 = self.encodings.get_many([(name1, crops[i][1]) for i in idx], cut)
            p0, p1 = self.model.predict(Encoding.cat(enc0), Encoding.cat(enc1), with_pts3d=False)
            for j, i in enumerate(idx):
                (l0, t0, r0, b0), (l1, t1, r1, b1) = crops[i]
                m = _extract_nonsym(p0["desc"][j], p1["desc"][j], p0["desc_conf"][j], p1["desc_conf"][j], self.conf)
                results[i] = Matches(m.xy1 + np.array([l0, t0]), m.xy2 + np.array([l1, t1]), m.conf)
        return [results[i] for i in range(len(crops))]


class _LazyOriginals:
    """Full-resolution images by name, decoded on first use (coarse-to-fine needs them only for the
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


def match_pair(model: MASt3R, image0: ImageLike, image1: ImageLike,
               conf: Union[str, MatcherConfig, Mapping[str, Any]] = "default") -> PairMatches:
    """Match two images (paths or :class:`LoadedImage`) with a preset; matches are in original-image
    pixels (hloc convention: (0, 0) is the centre of the top-left pixel), with scores."""
    return Matcher(model, conf).match_pair(image0, image1)
