"""Retrieval as MASt3R-SfM does it: the training-free retrieval model, its codebook, ASMK and the pair graph."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mast3r_colmap import retrieval as R
from mast3r_colmap.matching.dense import MASt3RNetwork
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.model.mast3r import Encoding
from mast3r_colmap.pairs import exhaustive, mast3r_sfm_graph, pairs_from_similarity, pairs_from_spec
from mast3r_colmap.retrieval.scoring import _nearest_words as nearest_words
from mast3r_colmap.testing.asmk_reference import asmk_available, asmk_package_similarity
from mast3r_colmap.testing.retrieval_weights import (
    learn_whitener,
    make_retrieval_args,
    make_retrieval_state_dict,
    train_codebook,
    write_codebook,
    write_retrieval_checkpoint,
)

HAVE_ASMK = asmk_available()


# ------------------------------------------------------------------------------------------ fixtures

def clustered_tokens(n_scenes: int = 4, views: int = 5, dim: int = 32, points: int = 150, seen: int = 90,
                     background: int = 30, noise: float = 0.3, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Token sets (S, dim) of images of ``n_scenes`` scenes: each view sees a random subset of its scene's
    points (plus noise) and unrelated background tokens. Returns the token sets and the scene labels."""
    rng = np.random.default_rng(seed)
    scenes = [rng.standard_normal((points, dim)) for _ in range(n_scenes)]
    tokens, labels = [], []
    for s in range(n_scenes):
        for _ in range(views):
            idx = rng.choice(points, seen, replace=False)
            t = np.concatenate([scenes[s][idx] + noise * rng.standard_normal((seen, dim)),
                                rng.standard_normal((background, dim))])
            tokens.append(t[rng.permutation(len(t))].astype(np.float32))
            labels.append(s)
    return tokens, np.array(labels)


def build_retriever(tmp_path: Path, tokens: list[np.ndarray], dim: int, k: int = 32, nfeat: int = 100,
                    name: str = "toy_retrieval_trainingfree.pth", **kw) -> R.Retriever:
    """A checkpoint whose whitener is learned on the tokens and whose codebook is k-means of the features."""
    pth, cb = write_retrieval_checkpoint(tmp_path / name, dim, k, nfeat=nfeat, codebook=False,
                                         samples=np.concatenate(tokens), **kw)
    model = R.load_retrieval_model(pth, encoder_dim=dim)
    feats = [model.local_features(torch.from_numpy(t))[0].numpy() for t in tokens]
    write_codebook(cb, train_codebook(np.concatenate(feats), k, seed=0), size=k)
    return R.Retriever.from_checkpoint(pth, encoder_dim=dim)


@pytest.fixture
def ckpt(tmp_path):
    """A small checkpoint with every optional module: prewhiten, a 2-layer projector and postwhiten."""
    pth, cb = write_retrieval_checkpoint(tmp_path / "m_retrieval_trainingfree.pth", 32, 16, hdims="24_20",
                                         postwhiten=True, nfeat=10, imsize=64, seed=3)
    return pth, cb


# ------------------------------------------------------------------------------------------ loading

def test_codebook_path():
    assert R.codebook_path("/a/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric_retrieval_trainingfree.pth") == \
        Path("/a/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric_retrieval_codebook.pkl")
    assert R.codebook_path("x/model.pth") == Path("x/codebook.pkl")


def test_load_shapes(ckpt):
    pth, _ = ckpt
    retriever = R.Retriever.from_checkpoint(pth, encoder_dim=32)
    model = retriever.model
    assert (model.input_dim, model.output_dim) == (32, 20)
    assert model.config.nfeat == 10 and model.config.imsize == 64 and model.config.hdims == (24, 20)
    assert retriever.centroids.shape == (16, 20) and retriever.centroids.dtype == np.float32
    assert model.local_features(torch.randn(2, 7, 32)).shape == (2, 7, 20)   # fewer tokens than nfeat
    assert model.local_features(torch.randn(3, 50, 32)).shape == (3, 10, 20)
    with pytest.raises(ValueError, match="encoder tokens"):
        model.local_features(torch.randn(1, 50, 31))
    retriever.check_encoder(32)
    with pytest.raises(R.RetrievalError, match="dimension 32"):
        retriever.check_encoder(64)


def test_args_from_file_and_nclusters_string(tmp_path):
    pth, cb = write_retrieval_checkpoint(tmp_path / "a_trainingfree.pth", 16, "1k", nfeat=7, imsize=224)
    r = R.load_retriever(pth, encoder_dim=16)
    assert r.model.config.nfeat == 7 and r.model.config.imsize == 224 and r.model.config.nclusters == "1k"
    assert r.centroids.shape == (1024, 16)


def test_whitening_matches_numpy(tmp_path):
    rng = np.random.default_rng(1)
    samples = rng.standard_normal((500, 24)) @ rng.standard_normal((24, 24)) + 3.0
    m, p = learn_whitener(samples)
    white = (samples - m) @ p
    np.testing.assert_allclose(np.cov(white.T), np.eye(24), atol=1e-8)  # PCA whitening
    pth, _ = write_retrieval_checkpoint(tmp_path / "w_trainingfree.pth", 24, 8, samples=samples, nfeat=5)
    model = R.load_retrieval_model(pth, encoder_dim=24)
    state = torch.load(pth, weights_only=False)["model"]
    assert state["prewhiten.p"].dtype == torch.float64
    tokens = torch.from_numpy(rng.standard_normal((2, 12, 24)).astype(np.float32))
    feats, att = model.features(tokens)
    ref = ((tokens.numpy().astype(np.float64) - state["prewhiten.m"].numpy()) @ state["prewhiten.p"].numpy())
    assert feats.dtype == torch.float32
    np.testing.assert_array_equal(feats.numpy(), ref.astype(np.float32))  # float64 math, cast back
    np.testing.assert_allclose(att.numpy(), np.linalg.norm(ref, axis=-1), rtol=1e-6)
    local = model.local_features(tokens).numpy()
    top = np.argsort(-np.linalg.norm(ref.astype(np.float32), axis=-1), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(local, np.take_along_axis(ref.astype(np.float32), top[..., None], 1))


def test_projector_residual_and_postwhiten_reference(tmp_path):
    dim = 16
    state = make_retrieval_state_dict(dim, hdims="12_16", postwhiten=True, seed=4)
    pth, _ = write_retrieval_checkpoint(tmp_path / "p_trainingfree.pth", dim, 8, hdims="12_16", residual=True,
                                        postwhiten=True, state=state)
    model = R.load_retrieval_model(pth, encoder_dim=dim)
    x = torch.randn(1, 9, dim, dtype=torch.float32)
    st = {k: v.double() for k, v in state.items()}
    xw = (x.double() - st["prewhiten.m"]) @ st["prewhiten.p"]
    h = xw @ st["projector.0.weight"].T + st["projector.0.bias"]
    h = torch.nn.functional.layer_norm(h, (12,), st["projector.1.weight"], st["projector.1.bias"], eps=1e-5)
    h = torch.nn.functional.gelu(h)
    y = h @ st["projector.3.weight"].T + st["projector.3.bias"] + xw
    ref = (y - st["postwhiten.m"]) @ st["postwhiten.p"]
    feats, att = model.features(x)
    np.testing.assert_allclose(feats.double().numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(att.double().numpy(), y.norm(dim=-1).numpy(), rtol=1e-4)


# ------------------------------------------------------------------------------------------ bad files

def _error(fn, *words):
    with pytest.raises(R.RetrievalError) as info:
        fn()
    for w in words:
        assert str(w) in str(info.value), str(info.value)
    return str(info.value)


def test_missing_codebook(tmp_path):
    pth, cb = write_retrieval_checkpoint(tmp_path / "m_trainingfree.pth", 16, 8, codebook=False)
    _error(lambda: R.load_retriever(pth), str(cb), "not found")


def test_codebook_wrong_size(tmp_path):
    pth, cb = write_retrieval_checkpoint(tmp_path / "m_trainingfree.pth", 16, 8)
    write_codebook(cb, np.zeros((4, 16), np.float32))            # params {'size': 4} != nclusters 8
    _error(lambda: R.load_retriever(pth), str(cb), "'size': 4")
    write_codebook(cb, np.zeros((4, 16), np.float32), size=8)    # params right, centroids wrong
    _error(lambda: R.load_retriever(pth), str(cb), "4 centroids")
    write_codebook(cb, np.zeros((8, 15), np.float32), size=8)    # wrong dimension
    _error(lambda: R.load_retriever(pth), str(cb), "dimension 15")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_codebook_disallowed_class(tmp_path):
    pth, cb = write_retrieval_checkpoint(tmp_path / "m_trainingfree.pth", 16, 8)
    with open(cb, "wb") as f:
        pickle.dump({"type": "Codebook", "params": {"size": 8}, "state": {"centroids": _Evil()}}, f)
    _error(lambda: R.load_retriever(pth), str(cb), "disallowed", "system")
    cb.write_bytes(b"\x80\x04 garbage")
    _error(lambda: R.load_retriever(pth), str(cb), "cannot read")
    with open(cb, "wb") as f:
        pickle.dump({"type": "Codebook", "params": {"size": 8}, "state": {"centroids": torch.zeros(8, 16)}}, f)
    _error(lambda: R.load_retriever(pth), str(cb), "disallowed")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_codebook_pickle_protocols_and_numpy1_names(tmp_path, protocol):
    cent = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    path = write_codebook(tmp_path / "c_codebook.pkl", cent, protocol=protocol)
    np.testing.assert_array_equal(R.read_codebook(path, 8, 16), cent)
    if protocol == 2:  # the layout written by numpy 1.x (module numpy.core)
        path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
        np.testing.assert_array_equal(R.read_codebook(path, 8, 16), cent)


def test_checkpoint_problems(tmp_path):
    good = make_retrieval_state_dict(16, seed=0)
    path = tmp_path / "x_trainingfree.pth"
    torch.save({"args": make_retrieval_args(8), "model": {**good, "extra.weight": torch.zeros(2)}}, path)
    _error(lambda: R.load_retrieval_model(path), str(path), "unexpected", "extra.weight")
    torch.save({"args": make_retrieval_args(8, postwhiten="pca"), "model": good}, path)
    _error(lambda: R.load_retrieval_model(path), str(path), "missing", "postwhiten.m")
    torch.save({"args": make_retrieval_args(8), "model": good}, path)
    _error(lambda: R.load_retrieval_model(path, encoder_dim=24), str(path), "dimension 16", "24")
    torch.save({"args": make_retrieval_args(8, hdims="12"), "model": {**good, "projector.0.weight": torch.zeros(12, 15),
                                                                      "projector.0.bias": torch.zeros(12)}}, path)
    _error(lambda: R.load_retrieval_model(path), str(path), "projector.0.weight", "(12, 16)")
    torch.save({"args": make_retrieval_args(8, featweights="uniform"), "model": good}, path)
    _error(lambda: R.load_retrieval_model(path), str(path), "featweights")
    args = make_retrieval_args(8)
    del args.nfeat
    torch.save({"args": args, "model": good}, path)
    _error(lambda: R.load_retrieval_model(path), str(path), "nfeat")
    torch.save({"args": make_retrieval_args(8), "model": good, "evil": _Evil()}, path)
    _error(lambda: R.load_retrieval_model(path), str(path), "cannot read")
    _error(lambda: R.load_retrieval_model(tmp_path / "none.pth"), "none.pth", "not found")
    # backbone entries (the official state_dict of the whole model) are ignored
    torch.save({"args": make_retrieval_args(8), "model": {**good, "backbone.enc_norm.weight": torch.ones(16)}}, path)
    assert R.load_retrieval_model(path, encoder_dim=16).input_dim == 16


# ------------------------------------------------------------------------------------------ ASMK

def test_true_neighbours_rank_first(tmp_path):
    tokens, labels = clustered_tokens(dim=64)
    retriever = build_retriever(tmp_path, tokens, 64, k=128)
    feats = [retriever.model.local_features(torch.from_numpy(t))[0].numpy() for t in tokens]
    assert all(f.shape == (100, 64) for f in feats)
    sim = retriever.similarity(feats)
    n = len(tokens)
    assert sim.shape == (n, n) and np.isfinite(sim).all() and (sim >= 0).all()
    np.testing.assert_array_equal(sim.argmax(axis=1), np.arange(n))  # every image retrieves itself first
    for i in range(n):
        same = (labels == labels[i]) & (np.arange(n) != i)
        assert sim[i, same].min() > 2 * sim[i, labels != labels[i]].max(), i
    # the pair graphs keep to the scenes
    names = [f"img{i:02d}.jpg" for i in range(n)]
    scene = dict(zip(names, labels))
    topk = pairs_from_similarity(names, sim, 3)
    assert topk and all(scene[a] == scene[b] for a, b in topk)
    graph = pairs_from_similarity(names, sim, 3, n_keys=4, seed=1)
    assert graph == pairs_from_similarity(names, sim, 3, n_keys=4, seed=1)  # deterministic with a seed
    assert graph == [(names[i], names[j]) for i, j in mast3r_sfm_graph(sim, 4, 3, seed=1)]
    # the graph's k nearest include the image itself (official behaviour): its k - 1 others are the top-(k - 1)
    assert set(pairs_from_similarity(names, sim, 2)) <= set(graph)


def test_builtin_asmk_kernel_by_hand():
    """Two images, two words, D = 8: the binary kernel computed by hand."""
    cent = np.array([[0] * 8, [10] * 8], np.float32)
    a = np.array([[1, -1, 1, -1, 1, -1, 1, -1], [1, 1, 1, 1, -1, -1, -1, -1]], np.float32)
    b = np.array([[1, -1, 1, -1, 1, -1, -1, 1]], np.float32)          # word 0 only, 2 bits differ from a's sum
    sim = R.asmk_similarity([a, b], cent, multiple_assignment=1)
    # a: word 0 residual sum = [2, 0, 2, 0, 0, -2, 0, -2] -> bits 10100000; b: 10101001 -> hamming 2/32
    # (asmk normalises by its packed length, 32 bits); single word each.
    s = (1 - 2 * 2 / 32) ** 3
    np.testing.assert_allclose(sim, [[1, s], [s, 1]], rtol=1e-6)


@pytest.mark.skipif(not HAVE_ASMK, reason="the asmk package is not installed")
def test_builtin_matches_asmk_package(tmp_path):
    tokens, _ = clustered_tokens(n_scenes=3, views=4, dim=32, seed=2)
    retriever = build_retriever(tmp_path, tokens, 32, k=24, nfeat=60)
    feats = [retriever.model.local_features(torch.from_numpy(t))[0].numpy() for t in tokens]
    ref = asmk_package_similarity(feats, retriever.centroids, codebook_size=24)
    out = R.asmk_similarity(feats, retriever.centroids)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-9)


def test_asmk_bad_input():
    cent = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="image 1"):
        R.asmk_similarity([np.ones((3, 8)), np.ones((3, 7))], cent)


@pytest.mark.parametrize("tile_elems", [2 ** 25, 1000])
def test_word_assignment_matches_faiss(tile_elems):
    """The torch nearest-word search gives faiss IndexFlatL2's words (which it replaced), in its order."""
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    cent = rng.standard_normal((300, 48)).astype(np.float32)
    x = np.concatenate([rng.standard_normal((500, 48)), cent[:40] + 0.05 * rng.standard_normal((40, 48))])
    x = x.astype(np.float32)
    index = faiss.IndexFlatL2(48)
    index.add(cent)
    ref = index.search(x, 5)[1]
    got = nearest_words(x, cent, 5, torch.device("cpu"), tile_elems=tile_elems)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got[500:, 0], np.arange(40))


def test_pairs_from_similarity_topk():
    sim = np.array([[9, 1, 5, 5], [0, 9, 0, 2], [3, 3, 9, 1], [0, 0, 0, 9]], float)
    names = ["a", "b", "c", "d"]
    # a -> c, d tie (lower index c); b -> d; c -> a, b tie (a); d -> a (all tie)
    assert pairs_from_similarity(names, sim, 1) == [("a", "c"), ("a", "d"), ("b", "d")]
    assert pairs_from_similarity(names, sim, 10) == exhaustive(names)
    with pytest.raises(ValueError, match="similarity"):
        pairs_from_similarity(names, sim[:3, :3], 1)
    assert pairs_from_spec("retrieval:1", names, similarity_fn=lambda ns: sim) == \
        pairs_from_similarity(names, sim, 1)
    assert pairs_from_spec("retrieval:2,1", names, seed=3, similarity_fn=lambda ns: sim) == \
        pairs_from_similarity(names, sim, 1, n_keys=2, seed=3)


# ------------------------------------------------------------------------------------------ with a Matcher

class PatchEncoder(torch.nn.Module):
    """A stand-in for the MASt3R encoder (plugged in like the model, through MASt3RNetwork): each 16x16
    patch linearly projected (no context)."""

    def __init__(self, dim: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * 16 * 16, dim, generator=g) / 16.0)
        self.conf = "patch-encoder"
        self.calls: list[int] = []

    @property
    def device(self) -> torch.device:
        return self.proj.device

    def encode(self, img: torch.Tensor, true_shape=None) -> Encoding:
        self.calls.append(img.shape[0])
        b, _, h, w = img.shape
        patches = torch.nn.functional.unfold(img, 16, stride=16).transpose(1, 2)  # (B, S, 768)
        return Encoding(patches @ self.proj, (h // 16, w // 16), 16)


def texture_views(folder: Path, n_scenes: int = 3, views: int = 4, size=(128, 96), seed: int = 0):
    """Views of random textures: crops at patch-aligned offsets, so views of one scene share patches."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names, labels = [], []
    w, h = size
    for s in range(n_scenes):
        texture = rng.integers(0, 256, (h + 48, w + 64, 3), dtype=np.uint8)
        for v in range(views):
            x0, y0 = 16 * v, 16 * v  # distinct views; neighbours share most patches
            name = f"s{s}_v{v}.png"
            Image.fromarray(texture[y0:y0 + h, x0:x0 + w]).save(folder / name)
            names.append(name)
            labels.append(s)
    return names, np.array(labels)


def test_retrieval_features_from_matcher_with_stub_encoder(tmp_path):
    names, labels = texture_views(tmp_path / "images")
    encoder = PatchEncoder(64)
    matcher = Matcher(MASt3RNetwork(encoder), get_config("default", image_size=128), image_dir=tmp_path / "images")
    tokens = [matcher.encodings.get_many([(n, None)], [matcher.image(n).img])[0].tokens[0].numpy() for n in names]
    retriever = build_retriever(tmp_path, tokens, 64, k=64, nfeat=40, imsize=128)
    assert tokens[0].shape == (48, 64)
    calls = len(encoder.calls)
    feats = R.retrieval_features(matcher, names, retriever.model)
    assert len(encoder.calls) == calls  # all cached: no new encoder run
    assert [f.shape for f in feats] == [(40, 64)] * len(names)
    sim = retriever.similarity_fn(matcher)(names)
    n = len(names)
    np.testing.assert_array_equal(sim.argmax(axis=1), np.arange(n))
    for i in range(n):
        same = (labels == labels[i]) & (np.arange(n) != i)
        assert sim[i, same].min() > sim[i, labels != labels[i]].max(), i
    scene = dict(zip(names, labels))
    pairs = pairs_from_spec("retrieval:2", names, similarity_fn=retriever.similarity_fn(matcher))
    assert pairs and all(scene[a] == scene[b] for a, b in pairs)


def _tiny_pngs(folder: Path, n: int = 4, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)
    names = []
    for i in range(n):
        x0 = 8 * i
        Image.fromarray(base[:, x0:x0 + 64]).save(folder / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


def test_encoder_runs_once_per_image(tmp_path, small_model, monkeypatch):
    names = _tiny_pngs(tmp_path / "images")
    pth, _ = write_retrieval_checkpoint(tmp_path / "small_retrieval_trainingfree.pth", 64, 8, nfeat=6, imsize=64)
    retriever = R.load_retriever(pth, encoder_dim=small_model.conf.enc_embed_dim)
    encoded: list[int] = []
    original = small_model.encode

    def counting(img, *args, **kwargs):
        encoded.append(img.shape[0])
        return original(img, *args, **kwargs)

    monkeypatch.setattr(small_model, "encode", counting)
    matcher = Matcher(small_model, get_config("default", image_size=64), image_dir=tmp_path / "images")
    pairs = pairs_from_spec("retrieval:2,2", names, seed=0, similarity_fn=retriever.similarity_fn(matcher))
    assert sum(encoded) == len(names)
    sim = retriever.similarity(retriever.features(matcher, names))
    assert sim.shape == (4, 4) and np.isfinite(sim).all()
    results = list(matcher.match_pairs(exhaustive(names)))
    assert len(results) == 6 and pairs
    assert sum(encoded) == len(names)  # retrieval and matching shared every encoding
    assert matcher.encodings.misses == len(names)


# ------------------------------------------------------------------------------------------ CLI

def test_cli_retrieval_model(tmp_path, small_pth, caplog, monkeypatch):
    from mast3r_colmap.matching import matcher as matcher_module
    from mast3r_colmap.run import EXIT_BAD_INPUT, main

    monkeypatch.setitem(matcher_module.confs, "default", {"image_size": 64})  # tiny images stay tiny (fast)
    images = tmp_path / "images"
    _tiny_pngs(images, 3)
    pth, cb = write_retrieval_checkpoint(tmp_path / "small_retrieval_trainingfree.pth", 64, 8, nfeat=50,
                                         imsize=64)
    argv = [str(images), str(tmp_path / "db.db"), "--checkpoint", str(small_pth), "--pairs", "retrieval:1,2",
            "--retrieval-model", str(pth), "--mapper", "none", "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert "ASMK" in caplog.text and "3 images" in caplog.text
    cb.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(argv) == EXIT_BAD_INPUT
    assert "codebook.pkl" in caplog.text and "not found" in caplog.text
