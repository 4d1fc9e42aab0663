"""The network beyond the golden vectors: other seeds, configurations and image sizes against an
independent float64 reference written from the spec (tests/reference_mast3r.py), and invariants of
the model API (batching, encode/predict, symmetric inference, errors, dtypes and devices)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_output_close
from mast3r_colmap.model import CONFIGS, Encoding, MASt3R, MASt3RConfig
from mast3r_colmap.model.checkpoint import match_state_dict
from mast3r_colmap.testing.weights import make_state_dict
from reference_mast3r import RefConfig, reference_forward, to_float64

PRED1 = ("pts3d", "conf", "desc", "desc_conf")
PRED2 = ("pts3d_in_other_view", "conf", "desc", "desc_conf")

#: enc 32-d × 1 block × 2 heads, dec 32-d × 4 blocks × 2 heads: hooks [0, 2, 3, 4]
TINY = MASt3RConfig(enc_embed_dim=32, enc_depth=1, enc_num_heads=2,
                    dec_embed_dim=32, dec_depth=4, dec_num_heads=2)
#: hooks [0, 3, 4, 6]; 16-d descriptors without a descriptor-confidence channel (desc_conf = conf)
ONECONF = MASt3RConfig(enc_embed_dim=64, enc_depth=2, enc_num_heads=4,
                       dec_embed_dim=32, dec_depth=6, dec_num_heads=2,
                       desc_dim=16, two_confs=False)
#: RoPE10000; head dims 16 (encoder) and 20 (decoder: halves of 10, pairs (j, j+5)); hooks [0, 3, 5, 7];
#: desc_conf with vmin 1 (the official fallback when desc_conf_mode is absent); conf clipped at vmax
ROPE1E4 = MASt3RConfig(enc_embed_dim=48, enc_depth=2, enc_num_heads=3,
                       dec_embed_dim=40, dec_depth=7, dec_num_heads=2, rope_freq=10000.0,
                       conf_mode=("exp", 0.5, 2.0), desc_conf_mode=("exp", 1.0, math.inf))


def _ref_config(c: MASt3RConfig) -> RefConfig:
    return RefConfig(enc_num_heads=c.enc_num_heads, dec_num_heads=c.dec_num_heads, rope_freq=c.rope_freq,
                     desc_dim=c.desc_dim, two_confs=c.two_confs, patch_size=c.patch_size,
                     conf_mode=c.conf_mode, desc_conf_mode=c.desc_conf_mode)


def _loaded(config, sd) -> MASt3R:
    """The network of ``config`` holding the tensors of ``sd``, built as load_model builds it (on the meta device,
    then the weights assigned: no random initialisation to overwrite)."""
    with torch.device("meta"):
        model = MASt3R(config)
    model.load_state_dict(match_state_dict(model, sd), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _model(config, seed: int) -> MASt3R:
    return _loaded(config, make_state_dict(config, seed))


def _images(seed: int, b: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def _view(img: torch.Tensor) -> dict:
    h, w = img.shape[-2:]
    return {"img": img, "true_shape": torch.tensor([[h, w]] * img.shape[0], dtype=torch.int32)}


def _assert_preds_close(pred1, pred2, ref1, ref2) -> None:
    assert set(pred1) == set(PRED1) and set(pred2) == set(PRED2)
    for pred, ref, keys in ((pred1, ref1, PRED1), (pred2, ref2, PRED2)):
        for k in keys:
            assert pred[k].dtype == torch.float32
            assert_output_close(k, pred[k], ref[k])


# ---- 1. against the independent reference ---------------------------------------------------------

REFERENCE_CASES = [
    # id, config, seed, batch, (H1, W1), (H2, W2)
    ("small-s3-48x64", "small", 3, 1, (48, 64), (48, 64)),
    ("small-s7-80x112-32x16", "small", 7, 1, (80, 112), (32, 16)),     # 5x7 grid: refinenet4 crop
    ("tiny-s5-48x32-b2", TINY, 5, 2, (48, 32), (48, 32)),
    ("tiny-s6-64x48-48x64", TINY, 6, 1, (64, 48), (48, 64)),
    ("oneconf-s11-16x16-48x32", ONECONF, 11, 1, (16, 16), (48, 32)),  # 1x1 grid
    ("oneconf-s12-16x16-b2", ONECONF, 12, 2, (16, 16), (16, 16)),
    ("rope1e4-s13-96x16-32x80", ROPE1E4, 13, 1, (96, 16), (32, 80)),
]


@pytest.mark.parametrize("config,seed,batch,shape1,shape2", [c[1:] for c in REFERENCE_CASES],
                         ids=[c[0] for c in REFERENCE_CASES])
def test_against_reference(config, seed, batch, shape1, shape2):
    conf = CONFIGS[config] if isinstance(config, str) else config
    sd = make_state_dict(conf, seed)
    model = _loaded(conf, sd)
    img1 = _images(100 + seed, batch, *shape1)
    img2 = _images(200 + seed, batch, *shape2)
    with torch.no_grad():
        pred1, pred2 = model(_view(img1), _view(img2))
    ref1, ref2 = reference_forward(to_float64(sd), _ref_config(conf), img1, img2)
    assert pred1["desc"].shape == (batch, *shape1, conf.desc_dim)
    assert pred2["pts3d_in_other_view"].shape == (batch, *shape2, 3)
    _assert_preds_close(pred1, pred2, ref1, ref2)
    if not conf.two_confs:
        assert torch.equal(pred1["desc_conf"], pred1["conf"]) and torch.equal(pred2["desc_conf"], pred2["conf"])
    lo, hi = conf.conf_mode[1], conf.conf_mode[2]
    for pred in (pred1, pred2):
        assert bool((pred["conf"] > lo).all() and (pred["conf"] <= hi).all())
        if math.isfinite(hi):  # the case exercises the clip at vmax: some pixels reach it, not all
            assert 0 < int((pred["conf"] == hi).sum()) < pred["conf"].numel()


def test_reference_equals_golden_vectors(vectors):
    """The reference itself reproduces the official outputs (small config, seed 1, 160x224)."""
    v = vectors("model_small")
    a, b = (torch.from_numpy(v[k])[None] for k in ("input_a", "input_b"))
    ref1, ref2 = reference_forward(to_float64(make_state_dict("small", 1)), _ref_config(CONFIGS["small"]), a, b)
    for k in PRED1:
        assert_output_close(k, ref1[k][0], v[f"same_pred1_{k}"])
    for k in PRED2:
        assert_output_close(k, ref2[k][0], v[f"same_pred2_{k}"])


def test_config_variants_have_the_official_head_sizes():
    """two_confs=False drops the descriptor-confidence channel of the local head; dims follow the config."""
    sd = make_state_dict(ONECONF, 1)
    assert sd["downstream_head1.head_local_features.fc2.weight"].shape == (16 * 256, 4 * (64 + 32))
    assert sd["downstream_head2.dpt.head.4.weight"].shape == (4, 128, 1, 1)
    assert MASt3RConfig().dpt_hooks == (0, 6, 9, 12)
    assert (TINY.dpt_hooks, ONECONF.dpt_hooks, ROPE1E4.dpt_hooks) == ((0, 2, 3, 4), (0, 3, 4, 6), (0, 3, 5, 7))


# ---- 2. API invariants -------------------------------------------------------------------------------

def _close(name, out, ref):
    """Same computation, differently batched: the conftest tolerances with the model as reference."""
    assert_output_close(name, out, ref.double())


def _assert_same(p, q, keys=None):
    keys = keys or sorted(q)
    assert set(p) >= set(keys)
    for k in keys:
        _close(k, p[k], q[k])


@pytest.fixture(scope="module")
def pair_imgs():
    return _images(1, 3, 32, 32), _images(2, 3, 32, 32), _images(3, 3, 48, 16)


@pytest.mark.parametrize("mixed", [False, True], ids=["same-shape", "mixed-shape"])
def test_batched_pairs_equal_single_pairs(small_model, pair_imgs, mixed):
    a, b, p = pair_imgs
    second = p if mixed else b
    with torch.no_grad():
        batch1, batch2 = small_model(_view(a), _view(second))
        for i in range(3):
            one1, one2 = small_model(_view(a[i:i + 1]), _view(second[i:i + 1]))
            _assert_same({k: v[i:i + 1] for k, v in batch1.items()}, one1, PRED1)
            _assert_same({k: v[i:i + 1] for k, v in batch2.items()}, one2, PRED2)


def test_encode_predict_equals_forward(small_model, pair_imgs):
    a, _, p = pair_imgs
    with torch.no_grad():
        fwd1, fwd2 = small_model(_view(a), _view(p))
        enc_a = small_model.encode(a, _view(a)["true_shape"])
        enc_p = small_model.encode(p)
        assert enc_a.grid == (2, 2) and enc_p.grid == (3, 1) and enc_p.image_shape == (48, 16)
        pre1, pre2 = small_model.predict(enc_a, enc_p)
    _assert_same(pre1, fwd1, PRED1)
    _assert_same(pre2, fwd2, PRED2)


def test_descriptor_only_path(small_model, pair_imgs):
    a, b, _ = pair_imgs
    with torch.no_grad():
        enc = small_model.encode(torch.cat([a, b]))
        full1, full2 = small_model.predict(enc[:3], enc[3:], with_pts3d=True)
        desc1, desc2 = small_model.predict(enc[:3], enc[3:], with_pts3d=False)
    assert set(desc1) == set(desc2) == {"desc", "desc_conf"}
    _assert_same(desc1, full1, ("desc", "desc_conf"))
    _assert_same(desc2, full2, ("desc", "desc_conf"))


def test_descriptor_only_path_two_confs_false():
    """Without a descriptor-confidence channel desc_conf is conf, so the DPT still runs."""
    model = _model(ONECONF, 2)
    a, b = _images(4, 1, 32, 32), _images(5, 1, 32, 32)
    with torch.no_grad():
        full1, full2 = model(_view(a), _view(b))
        desc1, desc2 = model.predict(model.encode(a), model.encode(b), with_pts3d=False)
    assert set(desc1) == set(desc2) == {"desc", "desc_conf"}
    _assert_same(desc1, full1, ("desc", "desc_conf"))
    _assert_same(desc2, full2, ("desc", "desc_conf"))
    assert torch.equal(full2["desc_conf"], full2["conf"])


@pytest.mark.parametrize("mixed", [False, True], ids=["same-shape", "mixed-shape"])
@pytest.mark.parametrize("with_pts3d", [False, True], ids=["desc", "pts3d"])
def test_symmetric_equals_both_orders(small_model, pair_imgs, mixed, with_pts3d):
    a, b, p = pair_imgs
    second = p if mixed else b
    with torch.no_grad():
        e1, e2 = small_model.encode(a[:2]), small_model.encode(second[:2])
        res11, res21, res22, res12 = small_model.symmetric(e1, e2, with_pts3d=with_pts3d)
        f1, f2 = small_model.predict(e1, e2, with_pts3d=with_pts3d)
        b2, b1 = small_model.predict(e2, e1, with_pts3d=with_pts3d)
    _assert_same(res11, f1)
    _assert_same(res21, f2)
    _assert_same(res22, b2)
    _assert_same(res12, b1)
    assert set(res11) == set(f1) and set(res21) == set(f2) and set(res22) == set(b2) and set(res12) == set(b1)
    assert res11["desc"].shape[:3] == (2, 32, 32) and res22["desc"].shape[:3] == (2, *second.shape[-2:])


def test_swapping_views_changes_outputs(small_model, pair_imgs):
    """Image a through (decoder 1, head 1) differs from image a through (decoder 2, head 2)."""
    a, b, _ = pair_imgs
    with torch.no_grad():
        ab1, ab2 = small_model(_view(a[:1]), _view(b[:1]))
        ba1, ba2 = small_model(_view(b[:1]), _view(a[:1]))
    for k in ("desc", "desc_conf", "conf"):
        assert (ab1[k] - ba2[k]).abs().max() > 1e-2, k
        assert (ab2[k] - ba1[k]).abs().max() > 1e-2, k
    assert (ab1["pts3d"] - ba2["pts3d_in_other_view"]).abs().max() > 1e-2


def test_errors(small_model):
    m = small_model
    ok = _images(0, 1, 32, 48)
    with pytest.raises(ValueError, match="multiple"):
        m(_view(_images(0, 1, 40, 48)), _view(_images(0, 1, 40, 48)))
    with pytest.raises(ValueError, match="multiple"):
        m(_view(ok), _view(_images(0, 1, 32, 50)))
    with pytest.raises(ValueError, match="multiple"):
        m.encode(_images(0, 1, 32, 8))
    with pytest.raises(ValueError, match="true_shape"):  # same-shape path
        m(_view(ok), {"img": ok, "true_shape": torch.tensor([[48, 32]])})
    with pytest.raises(ValueError, match="true_shape"):  # separately encoded path
        m({"img": ok, "true_shape": torch.tensor([[32, 64]])}, _view(_images(0, 1, 48, 32)))
    with pytest.raises(ValueError, match="true_shape"):
        m.encode(ok, torch.tensor([[16, 48]]))
    with pytest.raises(ValueError):
        m(_view(ok[0]), _view(ok[0]))                                   # rank 3
    with pytest.raises(ValueError):
        m.encode(ok[None])                                               # rank 5
    with pytest.raises(ValueError):
        m.encode(ok[:, :1])                                              # 1 channel
    e1, e2 = m.encode(ok), m.encode(_images(0, 1, 48, 32))
    with pytest.raises(ValueError, match="grid"):
        Encoding.cat([e1, e2])
    assert Encoding.cat([e1, e1]).tokens.shape[0] == 2
    with pytest.raises(ValueError):
        m.predict(Encoding.cat([e1, e1]), e2)                           # batch sizes differ


# ---- 3. dtypes and devices ---------------------------------------------------------------------------

def test_outputs_are_float32_on_cpu(small_model, pair_imgs):
    a, _, p = pair_imgs
    with torch.no_grad():
        pred1, pred2 = small_model(_view(a[:1]), _view(p[:1]))
        desc1, _ = small_model.predict(small_model.encode(a[:1]), small_model.encode(p[:1]), with_pts3d=False)
    for pred in (pred1, pred2, desc1):
        for k, v in pred.items():
            assert v.dtype == torch.float32 and v.device.type == "cpu", k


@pytest.mark.parametrize("dtype,min_cos", [(torch.bfloat16, 0.99), (torch.float16, 0.999)], ids=["bf16", "fp16"])
def test_mixed_precision(pair_imgs, dtype, min_cos):
    """amp_dtype autocasts encoder and decoder (here on the CPU, the same code path as on CUDA): outputs
    stay float32 from float32 heads, close to the float32 model; the descriptor-only path equals the full one."""
    a, _, p = pair_imgs
    model = _model("small", 1)
    with torch.no_grad():
        ref1, ref2 = model(_view(a), _view(p))
        model.amp_dtype = dtype
        enc_a, enc_p = model.encode(a), model.encode(p)
        assert enc_a.tokens.dtype == dtype  # the encoder ran in reduced precision
        full1, full2 = model.predict(enc_a, enc_p, with_pts3d=True)
        desc1, desc2 = model.predict(enc_a, enc_p, with_pts3d=False)
        model.amp_dtype = None
        again1, _ = model(_view(a), _view(p))
    for full, desc, ref in ((full1, desc1, ref1), (full2, desc2, ref2)):
        assert all(v.dtype == torch.float32 for v in (*full.values(), *desc.values()))
        torch.testing.assert_close(full["desc"].norm(dim=-1), torch.ones(full["desc"].shape[:-1]))  # fp32 head
        assert (full["desc"] * ref["desc"]).sum(-1).min() > min_cos
        torch.testing.assert_close(full["desc_conf"], ref["desc_conf"], rtol=0.05, atol=0)
        assert set(desc) == {"desc", "desc_conf"}
        for k in desc:
            torch.testing.assert_close(desc[k], full[k], rtol=0, atol=0)
    for k in PRED1:  # amp_dtype=None is float32 again
        torch.testing.assert_close(again1[k], ref1[k], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(small_model, pair_imgs):
    a, _, p = pair_imgs
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = _model("small", 1).cuda()
        with torch.no_grad():
            cpu1, cpu2 = small_model(_view(a), _view(p))
            gpu1, gpu2 = model({k: v.cuda() for k, v in _view(a).items()}, {k: v.cuda() for k, v in _view(p).items()})
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    for gpu, cpu, keys in ((gpu1, cpu1, PRED1), (gpu2, cpu2, PRED2)):
        assert set(gpu) == set(keys)
        for k in keys:
            assert gpu[k].dtype == torch.float32 and gpu[k].device.type == "cuda", k
            _close(k, gpu[k].cpu(), cpu[k])
