"""Dense matching: fast reciprocal matching, correspondence extraction, coarse-to-fine, the matcher and
the seam where a dense network (MASt3R, or the synthetic oracle of the tests) plugs into it."""

from .coarse_to_fine import select_crop_pairs
from .dense import DenseNetwork, MASt3RNetwork
from .extract import Matches, border_mask, extract_correspondences_nonsym, extract_correspondences_symmetric
from .frm import fast_reciprocal_nns, mutual_nearest_neighbours, nearest_neighbours
from .matcher import Matcher, MatcherConfig, confs, get_config, match_pair

__all__ = [
    "DenseNetwork", "MASt3RNetwork", "Matcher", "MatcherConfig", "Matches", "border_mask", "confs",
    "extract_correspondences_nonsym", "extract_correspondences_symmetric", "fast_reciprocal_nns", "get_config", "match_pair",
    "mutual_nearest_neighbours", "nearest_neighbours", "select_crop_pairs",
]
