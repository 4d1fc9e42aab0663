"""Prediction heads of MASt3R: the DPT regression head (pts3d + conf) and the local-feature MLP.

Module names mirror the official checkpoints (``dpt.scratch.layer1_rn``, ``dpt.act_postprocess.0.1``,
``head_local_features.fc1`` ...).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Mlp

DPT_LAYER_DIMS = (96, 192, 384, 768)
DPT_FEATURE_DIM = 256
DPT_LAST_DIM = 128


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """x2 bilinear upsampling with align_corners=True (as in the official DPT)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2x(x)


class ResidualConvUnit(nn.Module):
    """conv2(relu(conv1(relu(x)))) + x, with non-inplace ReLUs."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    """DPT feature fusion: (a + rcu1(b) | a) -> rcu2 -> x2 upsample -> 1x1 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_conv = nn.Conv2d(dim, dim, 1)
        self.resConfUnit1 = ResidualConvUnit(dim)
        self.resConfUnit2 = ResidualConvUnit(dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        return self.out_conv(upsample2x(self.resConfUnit2(x)))


class DPTScratch(nn.Module):
    def __init__(self, layer_dims: Sequence[int], feature_dim: int):
        super().__init__()
        for n, c in enumerate(layer_dims, start=1):
            setattr(self, f"layer{n}_rn", nn.Conv2d(c, feature_dim, 3, padding=1, bias=False))
        for n in range(1, 5):
            setattr(self, f"refinenet{n}", FusionBlock(feature_dim))


class DPTHead(nn.Module):
    """DPT regression head reading 4 hooked token sets: encoder output and 3 decoder layers."""

    def __init__(self, enc_dim: int, dec_dim: int, num_channels: int,
                 layer_dims: Sequence[int] = DPT_LAYER_DIMS, feature_dim: int = DPT_FEATURE_DIM,
                 last_dim: int = DPT_LAST_DIM):
        super().__init__()
        self.scratch = DPTScratch(layer_dims, feature_dim)
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, last_dim, 3, padding=1),
            Upsample2x(),
            nn.Conv2d(last_dim, last_dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(last_dim, num_channels, 1),
        )
        c0, c1, c2, c3 = layer_dims
        self.act_postprocess = nn.ModuleList([
            nn.Sequential(nn.Conv2d(enc_dim, c0, 1), nn.ConvTranspose2d(c0, c0, 4, stride=4)),
            nn.Sequential(nn.Conv2d(dec_dim, c1, 1), nn.ConvTranspose2d(c1, c1, 2, stride=2)),
            nn.Sequential(nn.Conv2d(dec_dim, c2, 1)),
            nn.Sequential(nn.Conv2d(dec_dim, c3, 1), nn.Conv2d(c3, c3, 3, stride=2, padding=1)),
        ])

    def forward(self, hooked: List[torch.Tensor], grid: Tuple[int, int]) -> torch.Tensor:
        """hooked: 4 token tensors (B, Hp*Wp, C_i) -> (B, num_channels, 16*Hp, 16*Wp)."""
        hp, wp = grid
        s = self.scratch
        maps = [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], hp, wp) for t in hooked]
        maps = [post(m) for post, m in zip(self.act_postprocess, maps)]
        l1, l2, l3, l4 = (rn(m) for rn, m in zip((s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn), maps))
        p4 = s.refinenet4(l4)[:, :, : l3.shape[2], : l3.shape[3]]
        p3 = s.refinenet3(p4, l3)
        p2 = s.refinenet2(p3, l2)
        p1 = s.refinenet1(p2, l1)
        return self.head(p1)


class MASt3RHead(nn.Module):
    """One downstream head (``downstream_head1`` or ``downstream_head2``): DPT + local features."""

    def __init__(self, enc_dim: int, dec_dim: int, dpt_channels: int, local_channels: int,
                 patch_size: int, mlp_ratio: float):
        super().__init__()
        self.dpt = DPTHead(enc_dim, dec_dim, dpt_channels)
        in_dim = enc_dim + dec_dim
        self.head_local_features = Mlp(in_dim, int(mlp_ratio * in_dim), local_channels * patch_size ** 2)
        self.patch_size = patch_size

    def local_features(self, enc: torch.Tensor, dec: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Raw local-feature output (B, local_channels, H, W): descriptor channels then the conf logit."""
        x = self.head_local_features(torch.cat([enc, dec], dim=-1))
        x = x.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return F.pixel_shuffle(x, self.patch_size)
