"""Tests for mast3r_colmap.model.pooling: GeM global descriptors of encoder tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mast3r_colmap.model.pooling import global_descriptor_from_tokens


def test_global_descriptor_hand_checked():
    tok = torch.tensor([[1.0, 2.0, -1.0], [3.0, 0.0, -2.0]])
    g = global_descriptor_from_tokens(tok)
    eps3 = 1e-18
    ref = np.array([((1 + 27) / 2) ** (1 / 3), ((8 + eps3) / 2) ** (1 / 3), eps3 ** (1 / 3)])
    ref /= np.linalg.norm(ref)
    assert g.shape == (3,) and g.dtype == torch.float32
    np.testing.assert_allclose(g.numpy(), ref, rtol=1e-6, atol=1e-9)
    # p = 1: mean of the ReLU'd tokens
    g1 = global_descriptor_from_tokens(tok, p=1.0)
    ref1 = np.array([2.0, 1.0, 1e-6])
    np.testing.assert_allclose(g1.numpy(), ref1 / np.linalg.norm(ref1), rtol=1e-6)


def test_global_descriptor_batch_norm_determinism():
    gen = torch.Generator().manual_seed(0)
    tok = torch.randn(3, 192, 64, generator=gen)
    g = global_descriptor_from_tokens(tok)
    assert g.shape == (3, 64)
    assert torch.allclose(g.norm(dim=-1), torch.ones(3), atol=1e-6)
    for b in range(3):
        assert torch.equal(global_descriptor_from_tokens(tok[b]), g[b])
    assert torch.equal(global_descriptor_from_tokens(tok), g)
    # independent of token order
    perm = torch.randperm(192, generator=gen)
    assert torch.allclose(global_descriptor_from_tokens(tok[:, perm]), g, rtol=1e-6, atol=1e-7)
    assert global_descriptor_from_tokens(tok.double()).dtype == torch.float64


def test_global_descriptor_errors():
    with pytest.raises(ValueError, match="shape"):
        global_descriptor_from_tokens(torch.zeros(5))
    with pytest.raises(ValueError, match="non-empty"):
        global_descriptor_from_tokens(torch.zeros(2, 0, 4))
    with pytest.raises(ValueError, match="p must be"):
        global_descriptor_from_tokens(torch.zeros(2, 4), p=0)
