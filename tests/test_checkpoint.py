"""Checkpoint loading: both official formats, hub ids through the cache, and every error path."""

from __future__ import annotations

import argparse
import fractions
import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_output_close
from mast3r_colmap.model import CONFIGS, MASt3R, MASt3RConfig
from mast3r_colmap.model.checkpoint import (CheckpointError, load_model, parse_constructor,
                                            read_official_pth)
from mast3r_colmap.testing.weights import constructor_string, make_state_dict


def _forward(model, vectors):
    v = vectors("model_small")
    a, b = (torch.from_numpy(v[k])[None] for k in ("input_a", "input_b"))
    with torch.no_grad():
        return model({"img": a}, {"img": b})


@pytest.fixture(scope="module")
def small_state():
    """The small seed-1 state_dict, drawn once: the tests change copies of the dict, never a tensor."""
    return make_state_dict("small", 1)


@pytest.fixture(scope="module")
def small_outputs(small_model, vectors):
    """The outputs of the small seed-1 model on the golden inputs, which every loaded copy must give."""
    return _forward(small_model, vectors)


def _save_pth(path, model_str, state):
    torch.save({"args": argparse.Namespace(model=model_str), "model": state, "epoch": 0}, path)


# ---- constructor strings ----------------------------------------------------------------------

def test_parse_full_constructor_string():
    kwargs = parse_constructor(constructor_string("full"))
    assert kwargs["depth_mode"] == ("exp", -math.inf, math.inf)
    assert kwargs["conf_mode"] == ("exp", 1, math.inf)
    assert kwargs["img_size"] == (512, 512)
    assert MASt3RConfig.from_official(kwargs) == CONFIGS["full"]


def test_parse_never_evaluates():
    with pytest.raises(CheckpointError, match="unsupported expression"):
        parse_constructor("AsymmetricMASt3R(enc_depth=__import__('os').system('true'))")
    with pytest.raises(CheckpointError, match="unsupported model class"):
        parse_constructor("AsymmetricCroCo3DStereo(enc_depth=24)")
    with pytest.raises(CheckpointError, match="keyword arguments only"):
        parse_constructor("AsymmetricMASt3R(24)")
    with pytest.raises(CheckpointError, match="cannot parse"):
        parse_constructor("AsymmetricMASt3R(enc_depth=")


def test_parse_inf_spellings():
    kw = parse_constructor("AsymmetricMASt3R(depth_mode=('exp', -np.inf, float('inf')), conf_mode=('exp', 1, +inf))")
    assert kw["depth_mode"] == ("exp", -math.inf, math.inf) and kw["conf_mode"] == ("exp", 1, math.inf)


def test_desc_conf_mode_falls_back_to_conf_mode():
    kw = parse_constructor(constructor_string("small").replace(", desc_conf_mode=('exp', 0, inf)", ""))
    assert "desc_conf_mode" not in kw
    assert MASt3RConfig.from_official(kw).desc_conf_mode == ("exp", 1.0, math.inf)


# ---- formats ---------------------------------------------------------------------------------

def test_load_official_pth(small_pth, small_outputs, vectors):
    model = load_model(small_pth, device="cpu")
    assert model.conf == CONFIGS["small"]
    assert not any(p.requires_grad for p in model.parameters())
    ours, ref = _forward(model, vectors), small_outputs
    for p, r in zip(ours, ref):
        for k in r:
            assert torch.equal(p[k], r[k]), k
    v = vectors("model_small")
    assert_output_close("desc", ours[0]["desc"][0], v["same_pred1_desc"])


def test_load_hub_dir(small_hub_dir, small_outputs, vectors):
    assert json.loads((small_hub_dir / "config.json").read_text())["depth_mode"] == ["exp", -math.inf, math.inf]
    model = load_model(small_hub_dir, device="cpu")
    ours, ref = _forward(model, vectors), small_outputs
    for p, r in zip(ours, ref):
        for k in r:
            assert torch.equal(p[k], r[k]), k
    # the .safetensors file itself is accepted too
    assert load_model(small_hub_dir / "model.safetensors", device="cpu").conf == CONFIGS["small"]


def test_load_hub_id_from_cache(small_hub_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--tests--mast3r-small" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(small_hub_dir / name, snapshot / name)
    (tmp_path / "models--tests--mast3r-small" / "refs").mkdir()
    (tmp_path / "models--tests--mast3r-small" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model = load_model("tests/mast3r-small", device="cpu")
    assert model.conf == CONFIGS["small"]


def test_offline_hub_id_has_clear_message(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as info:
        load_model("naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric", device="cpu")
    msg = str(info.value)
    assert "naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric" in msg
    assert "--checkpoint" in msg and ".pth" in msg and "CC BY-NC-SA" in msg


def test_missing_path():
    with pytest.raises(CheckpointError, match="not found"):
        load_model("/nonexistent/weights.pth", device="cpu")


def test_safe_unpickling_only(tmp_path):
    """A pickle with arbitrary objects is refused (weights_only), not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"args": argparse.Namespace(model=constructor_string("small")), "model": {}, "extra": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match="cannot read MASt3R checkpoint"):
        read_official_pth(path)


# ---- error paths -----------------------------------------------------------------------------

def test_truncated_file(small_pth, tmp_path):
    path = tmp_path / "truncated.pth"
    data = small_pth.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_model(path, device="cpu")


def test_truncated_safetensors(small_hub_dir, tmp_path):
    shutil.copy(small_hub_dir / "config.json", tmp_path / "config.json")
    data = (small_hub_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path, device="cpu")


def test_unknown_key(tmp_path, small_state):
    state = dict(small_state)
    state["enc_blocks.0.attn.extra.weight"] = torch.zeros(3)
    _save_pth(tmp_path / "x.pth", constructor_string("small"), state)
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): enc_blocks.0.attn.extra.weight"):
        load_model(tmp_path / "x.pth", device="cpu")


def test_missing_key(tmp_path, small_state):
    state = dict(small_state)
    del state["dec_blocks2.3.cross_attn.projk.bias"]
    _save_pth(tmp_path / "x.pth", constructor_string("small"), state)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): dec_blocks2.3.cross_attn.projk.bias"):
        load_model(tmp_path / "x.pth", device="cpu")


def test_shape_mismatch(tmp_path, small_state):
    state = dict(small_state)
    state["enc_norm.weight"] = torch.ones(65)
    _save_pth(tmp_path / "x.pth", constructor_string("small"), state)
    with pytest.raises(CheckpointError, match=r"enc_norm.weight: checkpoint \(65,\) vs network \(64,\)"):
        load_model(tmp_path / "x.pth", device="cpu")


def test_unknown_constructor_argument(tmp_path, small_state):
    _save_pth(tmp_path / "x.pth", constructor_string("small")[:-1] + ", fancy_option=3)", small_state)
    with pytest.raises(CheckpointError, match="unknown constructor argument.*fancy_option"):
        load_model(tmp_path / "x.pth", device="cpu")


def test_unsupported_head(tmp_path):
    _save_pth(tmp_path / "x.pth", constructor_string("small").replace("catmlp+dpt", "linear"), {})
    with pytest.raises(CheckpointError, match="unsupported head_type"):
        load_model(tmp_path / "x.pth", device="cpu")


def test_not_a_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="expected the keys 'args' and 'model'"):
        load_model(tmp_path / "x.pth", device="cpu")


def test_hub_dir_without_weights(small_hub_dir, tmp_path):
    shutil.copy(small_hub_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model(tmp_path, device="cpu")


def test_aliases_are_optional_and_checked(tmp_path, small_state):
    state = small_state
    # the safetensors form: aliases absent
    no_alias = {k: v for k, v in state.items() if ".layer_rn." not in k and k != "mask_token"}
    _save_pth(tmp_path / "a.pth", constructor_string("small"), no_alias)
    load_model(tmp_path / "a.pth", device="cpu")
    # an alias that disagrees with its original is an error
    bad = dict(state)
    bad["downstream_head2.dpt.scratch.layer_rn.1.weight"] = state["downstream_head2.dpt.scratch.layer2_rn.weight"] + 1
    _save_pth(tmp_path / "b.pth", constructor_string("small"), bad)
    with pytest.raises(CheckpointError, match="alias of downstream_head2.dpt.scratch.layer2_rn.weight"):
        load_model(tmp_path / "b.pth", device="cpu")


def test_model_on_meta_then_cpu_has_no_meta_tensors(small_pth):
    model = load_model(small_pth, device="cpu")
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 45_042_120 - 48  # all but the unused mask_token


def test_default_conf_is_the_released_model():
    assert MASt3R.__init__.__defaults__ == (None,)
    assert CONFIGS["full"].enc_embed_dim == 1024 and CONFIGS["full"].dec_depth == 12
    assert np.isinf(CONFIGS["full"].depth_mode[1])
