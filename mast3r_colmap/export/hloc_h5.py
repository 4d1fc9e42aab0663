"""hloc-compatible ``features.h5`` / ``matches.h5`` files.

Layout (as hloc's ``extract_features`` / ``match_features`` / ``match_dense`` and ``hloc.utils.io``):

* features: one group per image name; a ``/`` in the name makes nested groups. Datasets
  ``keypoints`` float32 (N, 2) in hloc's convention ((0, 0) = centre of the top-left pixel; never fp16),
  ``scores`` float32 (N,) (``extract_features``'s name; readers here also accept ``match_dense``'s
  ``score``) and, when known, ``image_size`` int64 (W, H) of the original image. An optional
  ``uncertainty`` attribute on ``keypoints`` is read by hloc's triangulation.
* matches: one group per pair, :func:`names_to_pair` ``(n0, n1)`` (two nested groups), with
  ``matches0`` int32 (N0,): index of the match in image 1 or -1, and ``matching_scores0`` float32 (N0,),
  0 where unmatched. hloc's sparse matchers write float16 here; MASt3R's scores (products of descriptor
  confidences, >= 1 and unbounded above) overflow float16 to inf, so they are stored as float32, which
  every hloc reader accepts: no overflow, order kept.

Writing policy: every write goes to a temporary file in the same folder that is moved into place with
``os.replace``, so a crash never leaves a half-written file that hloc would read. Without ``replace``,
an existing file is copied first and each image / pair group that is written replaces the group of the
same name (other entries are kept), which is what hloc's incremental pipelines (e.g. adding query images
to the mapping features) need; with ``replace=True`` the file holds exactly what is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np

from ..structures import ImageKeypoints, IndexMatches
from ..utils import atomic_replace

__all__ = [
    "list_h5_names",
    "find_pair",
    "names_to_pair",
    "names_to_pair_old",
    "read_features",
    "read_matches",
    "write_features",
    "write_matches",
]

logger = logging.getLogger(__name__)


def names_to_pair(name0: str, name1: str, separator: str = "/") -> str:
    """hloc's pair key: ``name0.replace('/', '-') + separator + name1.replace('/', '-')``."""
    return separator.join((name0.replace("/", "-"), name1.replace("/", "-")))


def names_to_pair_old(name0: str, name1: str) -> str:
    """hloc's legacy flat pair key, joined with ``_``."""
    return names_to_pair(name0, name1, separator="_")


@contextlib.contextmanager
def _open_for_write(path: str | os.PathLike, replace: bool = False) -> Iterator[h5py.File]:
    """An h5py file on a temporary copy of ``path`` (empty if ``replace`` or new), moved into place on success."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist")
    keep = path.exists() and not replace
    with atomic_replace(path) as tmp:
        if keep:
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a" if keep else "w", libver="latest") as f:
            yield f


def _replace_group(f: h5py.File, key: str) -> h5py.Group:
    if key in f:
        del f[key]
    return f.create_group(key)


def write_features(
    path: str | os.PathLike,
    keypoints: Mapping[str, ImageKeypoints] | Iterable[ImageKeypoints],
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
    uncertainty: float | None = None,
    replace: bool = False,
) -> None:
    """Write per-image keypoints (hloc convention) to an hloc ``features.h5``.

    Args:
        keypoints: ``{name: ImageKeypoints}`` or an iterable of them (their ``name`` is used).
        image_sizes: optional ``{name: (W, H)}`` written as ``image_size`` int64.
        uncertainty: optional keypoint noise (px) stored as the ``uncertainty`` attribute.
        replace: write a new file holding only these images (else other images of an existing file stay).
    """
    items = list(keypoints.values()) if isinstance(keypoints, Mapping) else list(keypoints)
    with _open_for_write(path, replace) as f:
        for kp in items:
            grp = _replace_group(f, kp.name)
            dset = grp.create_dataset("keypoints", data=np.asarray(kp.keypoints, np.float32).reshape(-1, 2))
            if uncertainty is not None:
                dset.attrs["uncertainty"] = float(uncertainty)
            grp.create_dataset("scores", data=np.asarray(kp.scores, np.float32))
            if image_sizes is not None and kp.name in image_sizes:
                grp.create_dataset("image_size", data=np.asarray(image_sizes[kp.name], np.int64).reshape(2))
    logger.info("wrote keypoints of %d images to %s", len(items), path)


def write_matches(
    path: str | os.PathLike,
    matches: Iterable[IndexMatches],
    num_keypoints0: Mapping[str, int] | None = None,
    replace: bool = False,
) -> None:
    """Write pair matches to an hloc ``matches.h5`` under ``names_to_pair(name0, name1)``.

    Args:
        num_keypoints0: ``{name: number of keypoints}``; ``matches0`` of a pair gets the length of its
            image 0. If ``None``, the length is ``max(idx0) + 1`` (as ``match_dense`` does), so readers
            must not assume ``len(matches0) == N0``.
        replace: write a new file holding only these pairs (else other pairs of an existing file stay).

    Raises:
        ValueError: an image 0 missing from ``num_keypoints0``, an index out of range, or an index of
            image 0 matched twice (``matches0`` holds one match per keypoint).
    """
    matches = list(matches)
    with _open_for_write(path, replace) as f:
        for m in matches:
            idx = np.asarray(m.matches, np.int64).reshape(-1, 2)
            if num_keypoints0 is None:
                n0 = int(idx[:, 0].max()) + 1 if len(idx) else 0
            else:
                if m.name0 not in num_keypoints0:
                    raise ValueError(f"pair {m.name0!r}/{m.name1!r}: unknown number of keypoints of {m.name0!r}")
                n0 = int(num_keypoints0[m.name0])
            if len(idx) and (idx.min() < 0 or idx[:, 0].max() >= n0 or idx[:, 1].max() > np.iinfo(np.int32).max):
                raise ValueError(f"pair {m.name0!r}/{m.name1!r}: keypoint index out of range (N0 = {n0})")
            if len(np.unique(idx[:, 0])) != len(idx):
                raise ValueError(f"pair {m.name0!r}/{m.name1!r}: a keypoint of {m.name0!r} is matched twice")
            matches0 = np.full(n0, -1, np.int32)
            scores0 = np.zeros(n0, np.float32)
            matches0[idx[:, 0]] = idx[:, 1]
            scores0[idx[:, 0]] = np.asarray(m.scores, np.float32)
            grp = _replace_group(f, names_to_pair(m.name0, m.name1))
            grp.create_dataset("matches0", data=matches0)
            grp.create_dataset("matching_scores0", data=scores0)
    logger.info("wrote matches of %d pairs to %s", len(matches), path)


def list_h5_names(path: str | os.PathLike) -> list[str]:
    """Names of all groups holding datasets (image names of a features file, pair keys of a matches file)."""
    names: set[str] = set()

    def visit(_: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Dataset):
            names.add(obj.parent.name.strip("/"))

    with h5py.File(path, "r", libver="latest") as f:
        f.visititems(visit)
    return sorted(names)


def read_features(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, ImageKeypoints]:
    """Read keypoints (and ``scores`` or ``score`` when present) of all or of the given images."""
    wanted = list_h5_names(path) if names is None else list(names)
    out: dict[str, ImageKeypoints] = {}
    with h5py.File(path, "r", libver="latest") as f:
        for name in wanted:
            if name not in f or "keypoints" not in f[name]:
                raise KeyError(f"image {name!r} has no keypoints in {str(path)!r}")
            grp = f[name]
            kps = np.asarray(grp["keypoints"], np.float64)
            scores = None
            for key in ("scores", "score"):
                if key in grp:
                    scores = np.asarray(grp[key], np.float32)
                    break
            out[name] = ImageKeypoints(name, kps, scores)
    return out


def find_pair(f: h5py.File, name0: str, name1: str) -> tuple[str, bool]:
    """hloc's ``find_pair``: the key of a pair in an open matches file and whether it is reversed.

    Tried in order: new (n0, n1), new (n1, n0), old ``_`` (n0, n1), old (n1, n0).
    """
    for key, reverse in ((names_to_pair(name0, name1), False), (names_to_pair(name1, name0), True),
                         (names_to_pair_old(name0, name1), False), (names_to_pair_old(name1, name0), True)):
        if key in f and isinstance(f[key], h5py.Group) and "matches0" in f[key]:
            return key, reverse
    raise KeyError(f"pair ({name0!r}, {name1!r}) not found in {f.filename!r} in any of the four key forms")


def read_matches(path: str | os.PathLike, name0: str, name1: str) -> IndexMatches:
    """Matches of ``(name0, name1)`` as indices ``[idx0, idx1]``, whichever order the file stores."""
    with h5py.File(path, "r", libver="latest") as f:
        key, reverse = find_pair(f, name0, name1)
        matches0 = np.asarray(f[key]["matches0"], np.int64)
        scores0 = (np.asarray(f[key]["matching_scores0"], np.float32) if "matching_scores0" in f[key]
                   else np.ones(len(matches0), np.float32))
    idx = np.flatnonzero(matches0 != -1)
    m = np.stack([idx, matches0[idx]], -1)
    if reverse:
        m = m[:, ::-1]
    return IndexMatches(name0, name1, m, scores0[idx])
