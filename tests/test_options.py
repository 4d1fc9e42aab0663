"""pycolmap option objects from nested dicts (mast3r_colmap.options)."""

import pycolmap
import pytest

from mast3r_colmap.verification import DEFAULT_VERIFICATION_OPTIONS, verification_options
from mast3r_colmap.options import build, merge


def test_merge_is_recursive_and_strict():
    base = {"a": 1, "sub": {"b": 2, "c": 3}}
    assert merge(base, {"sub": {"c": 4}}) == {"a": 1, "sub": {"b": 2, "c": 4}}
    assert base == {"a": 1, "sub": {"b": 2, "c": 3}}  # not modified
    with pytest.raises(ValueError, match=r"unknown option 'd'; known: b, c"):
        merge(base, {"sub": {"d": 0}})


def test_build_order_defaults_then_caller():
    opts = build(pycolmap.TwoViewGeometryOptions, {"ransac": {"max_error": 2.5}}, DEFAULT_VERIFICATION_OPTIONS)
    assert opts.ransac.max_error == 2.5
    assert opts.ransac.max_num_trials == 20000 and opts.ransac.random_seed == 0  # ours
    assert opts.min_num_inliers == pycolmap.TwoViewGeometryOptions().min_num_inliers  # pycolmap's


def test_build_takes_an_options_object_and_sets_only_unset_seeds():
    given = pycolmap.IncrementalPipelineOptions()
    given.min_num_matches = 33
    opts = build(pycolmap.IncrementalPipelineOptions, given, {"min_num_matches": 5}, seed=7)
    assert opts.min_num_matches == 33 and opts.random_seed == 7
    given.random_seed = 3
    assert build(pycolmap.IncrementalPipelineOptions, given, seed=7).random_seed == 3


def test_misspelt_verification_option_is_an_error():
    with pytest.raises(ValueError, match="max_eror"):
        verification_options({"ransac": {"max_eror": 1.0}})
