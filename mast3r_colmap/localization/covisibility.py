"""Covisibility in a reference model: images linked by shared 3D points.

* :func:`pairs_from_covisibility`: hloc's ``pairs_from_covisibility`` (each registered image with its
  ``k`` most covisible images), the db-db pairs of a triangulation;
* :func:`covisibility_clusters`: connected components of retrieved images, for PnP per cluster.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pycolmap
from scipy import sparse

from .reference import has_pose

__all__ = ["covisibility_clusters", "pairs_from_covisibility"]

logger = logging.getLogger(__name__)


def covisibility_clusters(reconstruction: pycolmap.Reconstruction, names: Sequence[str],
                          point_ids: Optional[Mapping[str, np.ndarray]] = None) -> List[List[str]]:
    """Connected components of ``names`` (reference images) linked by shared 3D points.

    Components are sorted by size (largest first), then by first appearance; images keep the order of
    ``names`` inside a component. ``point_ids`` ({name: ids}) avoids re-reading the model.
    """
    names = list(dict.fromkeys(names))
    if not names:
        return []
    if point_ids is None:
        by_name = {img.name: img for img in reconstruction.images.values()}
        point_ids = {}
        for n in names:
            img = by_name[n]
            pts = img.points2D
            point_ids[n] = np.array([pts[int(i)].point3D_id for i in img.get_observation_point2D_idxs()], np.int64)
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: Dict[int, int] = {}
    for i, n in enumerate(names):
        ids = np.unique(np.asarray(point_ids[n], np.int64))
        for p in ids[ids >= 0].tolist():
            j = owner.setdefault(p, i)
            if j != i:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    groups: Dict[int, List[str]] = {}
    for i, n in enumerate(names):
        groups.setdefault(find(i), []).append(n)
    return sorted(groups.values(), key=lambda g: (-len(g), names.index(g[0])))


def pairs_from_covisibility(reconstruction: pycolmap.Reconstruction, k: int) -> List[Tuple[str, str]]:
    """hloc's ``pairs_from_covisibility``: each registered image with its ``k`` most covisible images.

    Covisibility is the number of shared 3D points. Neighbours are ranked by that count (descending), ties
    by image id; images sharing no point are never paired. The result lists, for every image in image-id
    order, ``(image, neighbour)`` best first, without repeats: a pair already listed in the other order is
    dropped (hloc's file keeps both orders; the matches would be the same).
    """
    if isinstance(k, bool) or int(k) < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    image_ids = sorted(i for i, img in reconstruction.images.items() if has_pose(img))
    names = [reconstruction.images[i].name for i in image_ids]
    rows, cols = [], []
    for r, i in enumerate(image_ids):
        img = reconstruction.images[i]
        pts = img.points2D
        ids = np.unique([int(pts[int(j)].point3D_id) for j in img.get_observation_point2D_idxs()])
        rows.append(np.full(len(ids), r, np.int64))
        cols.append(ids.astype(np.int64))
    if not rows or not sum(len(c) for c in cols):
        logger.warning("pairs_from_covisibility: the model has no 3D points, no pairs")
        return []
    all_cols = np.concatenate(cols)
    uniq, col_idx = np.unique(all_cols, return_inverse=True)
    m = sparse.csr_matrix((np.ones(len(all_cols), np.float64), (np.concatenate(rows), col_idx)),
                          shape=(len(image_ids), len(uniq)))
    cov = (m @ m.T).tocsr()
    pairs: List[Tuple[str, str]] = []
    seen: set = set()
    lonely = 0
    for r in range(len(image_ids)):
        start, end = cov.indptr[r], cov.indptr[r + 1]
        nb, cnt = cov.indices[start:end], cov.data[start:end]
        keep = (nb != r) & (cnt > 0)
        nb, cnt = nb[keep], cnt[keep]
        if len(nb) == 0:
            lonely += 1
            continue
        order = np.lexsort((nb, -cnt))[:k]
        for j in nb[order].tolist():
            key = (min(r, j), max(r, j))
            if key not in seen:
                seen.add(key)
                pairs.append((names[r], names[j]))
    if lonely:
        logger.warning("pairs_from_covisibility: %d image(s) share no 3D point with any other", lonely)
    logger.info("pairs_from_covisibility(k=%d): %d images -> %d pairs", k, len(image_ids), len(pairs))
    return pairs
