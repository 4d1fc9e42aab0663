"""The network against the golden vectors of the official implementation (small and full configs)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import assert_output_close
from mast3r_colmap.model import MASt3R
from mast3r_colmap.model.checkpoint import match_state_dict
from mast3r_colmap.testing.weights import make_state_dict, weights_checksum

PRED1 = ("pts3d", "conf", "desc", "desc_conf")
PRED2 = ("pts3d_in_other_view", "conf", "desc", "desc_conf")
#: intermediates: max |out - ref| relative to max |ref| (observed ~1e-6; a LayerNorm-eps bug gives ~1e-4)
INTERMEDIATE_OF_MAX = 2e-5


def _img(v, key):
    return torch.from_numpy(v[key])[None]


def _assert_of_max(name, out, ref, tol=INTERMEDIATE_OF_MAX):
    out = out.detach().numpy() if isinstance(out, torch.Tensor) else out
    assert out.shape == ref.shape, name
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err <= tol, f"{name}: {err:.2e} of max > {tol}"


@pytest.fixture(scope="module")
def same_pair(small_model, vectors):
    v = vectors("model_small")
    view1 = {"img": _img(v, "input_a"), "true_shape": torch.tensor([[160, 224]], dtype=torch.int32)}
    view2 = {"img": _img(v, "input_b"), "true_shape": torch.tensor([[160, 224]], dtype=torch.int32)}
    with torch.no_grad():
        return small_model(view1, view2)


def test_small_weights_checksum():
    sd = make_state_dict("small", 1)
    assert len(sd) == 657
    assert weights_checksum(sd) == "5470907ec5e66cbcb6a416de6403681fe035b8e6f6a964b64fec6c179ee7b492"
    unique = {id(t): t.numel() for t in sd.values()}
    assert sum(unique.values()) == 45_042_120


@pytest.mark.parametrize("config", ["small", "full"])
def test_layout_matches_official_key_list(config):
    from conftest import DATA
    from mast3r_colmap.testing.weights import state_dict_layout

    ref = [tuple(line.split("\t")) for line in (DATA / f"keys_{config}.txt").read_text().splitlines()]
    assert [(k, str(s)) for k, s in state_dict_layout(config)] == ref


def test_small_same_pair_outputs(same_pair, vectors):
    v = vectors("model_small")
    pred1, pred2 = same_pair
    assert set(pred1) == set(PRED1) and set(pred2) == set(PRED2)
    for k in PRED1:
        assert pred1[k].dtype == torch.float32
        assert_output_close(k, pred1[k][0], v[f"same_pred1_{k}"])
    for k in PRED2:
        assert_output_close(k, pred2[k][0], v[f"same_pred2_{k}"])


def test_small_intermediates(small_model, vectors):
    v = vectors("model_small")
    m = small_model
    with torch.no_grad():
        enc = m.encode(torch.cat([_img(v, "input_a"), _img(v, "input_b")]))
        _assert_of_max("enc_out", enc.tokens, v["same_enc_out"])
        tok1, tok2 = m.decode(enc[0], enc[1], keep=m.conf.dpt_hooks)
        _assert_of_max("dec1_last", tok1[-1][0], v["same_dec1_last"])
        _assert_of_max("dec2_last", tok2[-1][0], v["same_dec2_last"])
        for h, (head, e, tok) in enumerate(((m.downstream_head1, enc[0], tok1), (m.downstream_head2, enc[1], tok2)), 1):
            dpt = head.dpt(tok[:4], enc.grid)[0]
            _assert_of_max(f"dpt{h}_raw", dpt[:, ::2, ::2], v[f"same_dpt{h}_raw_sub2"])
            raw = head.head_local_features(torch.cat([e.tokens, tok[-1]], -1))[0, :7]
            _assert_of_max(f"local{h}_raw", raw, v[f"same_local{h}_raw_tok0to6"])


def test_small_mixed_pair(small_model, vectors):
    """Portrait view 1 (224x160) with landscape view 2 (160x224): encoded separately."""
    v = vectors("model_small")
    with torch.no_grad():
        pred1, pred2 = small_model({"img": _img(v, "input_p")}, {"img": _img(v, "input_a")})
    assert pred1["desc"].shape == (1, 224, 160, 24) and pred2["desc"].shape == (1, 160, 224, 24)
    for k in PRED1:
        assert_output_close(k, pred1[k][0, ::2, ::2], v[f"mixed_pred1_{k}_sub2"])
    for k in PRED2:
        assert_output_close(k, pred2[k][0, ::2, ::2], v[f"mixed_pred2_{k}_sub2"])


def test_small_symmetric_inference(small_model, vectors):
    """One encoding per image, both orders: res11/res21 equal the forward pass, res22/res12 the vectors."""
    v, s = vectors("model_small"), vectors("symmetric_small")
    m = small_model
    with torch.no_grad():
        enc = m.encode(torch.cat([_img(v, "input_a"), _img(v, "input_b")]))
        res11, res21, res22, res12 = m.symmetric(enc[0], enc[1])
    for res in (res11, res21, res22, res12):
        assert set(res) == {"desc", "desc_conf"}
    for k in ("desc", "desc_conf"):
        assert_output_close(k, res11[k][0], v[f"same_pred1_{k}"])
        assert_output_close(k, res21[k][0], v[f"same_pred2_{k}"])
        assert_output_close(k, res22[k][0], s[f"res22_{k}"])
        assert_output_close(k, res12[k][0], s[f"res12_{k}"])


@pytest.mark.slow
def test_full_config_outputs(vectors):
    """The released architecture (ViT-L encoder, base decoder) with generated seed-2 weights."""
    v = vectors("model_full")
    sd = make_state_dict("full", 2)
    assert len(sd) == 1017
    assert sum({id(t): t.numel() for t in sd.values()}.values()) == 688_638_856
    with ThreadPoolExecutor(1) as pool:
        checksum = pool.submit(weights_checksum, sd)  # 2.75 GB hashed while the network runs (sha256 frees the GIL)
        with torch.device("meta"):
            model = MASt3R("full")
        model.load_state_dict(match_state_dict(model, sd), strict=True, assign=True)
        del sd
        model.eval().requires_grad_(False)
        with torch.no_grad():
            pred1, pred2 = model({"img": _img(v, "input_a")}, {"img": _img(v, "input_b")})
            desc1, desc2 = model.predict(*_split(model.encode(torch.cat([_img(v, "input_a"), _img(v, "input_b")]))),
                                         with_pts3d=False)
    assert checksum.result() == "899785cb28f4cb87d94821642cf3b58c8877c90d3f95bcdfe5c5c78926ab6ff8"
    for k in PRED1:
        assert_output_close(k, pred1[k][0], v[f"pred1_{k}"])
    for k in PRED2:
        assert_output_close(k, pred2[k][0], v[f"pred2_{k}"])
    for k in ("desc", "desc_conf"):  # the descriptor-only path gives the same descriptors
        assert_output_close(k, desc1[k][0], v[f"pred1_{k}"])
        assert_output_close(k, desc2[k][0], v[f"pred2_{k}"])


def _split(enc):
    return enc[0], enc[1]
