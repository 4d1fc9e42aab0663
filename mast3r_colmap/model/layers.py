"""Transformer building blocks of the MASt3R network: 2D rotary embeddings, attention, blocks.

Parameter names follow the official checkpoints (``attn.qkv``, ``cross_attn.projq`` ...) so that
state_dicts load without renaming.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm with the epsilon of the official model (1e-6)."""
    return nn.LayerNorm(dim, eps=LN_EPS)


class RoPE2D:
    """2D rotary position embedding (rotate-half layout, y on the first half of a head, x on the second).

    For a half of size D and F = D/2, the pair (j, j+F) is rotated by the angle p * freq^(-2j/D),
    with p the y (first half) or x (second half) patch coordinate.
    """

    def __init__(self, freq: float = 100.0):
        self.freq = float(freq)

    def tables(self, grid: Tuple[int, int], head_dim: int, device: torch.device,
               dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables of shape (N, head_dim) for the row-major patch grid (Hp, Wp)."""
        cos, sin = _rope_tables(grid, head_dim, self.freq, str(device))
        return cos.to(dtype), sin.to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, heads, N, head_dim) with tables from :meth:`tables`."""
        half = x.shape[-1] // 2
        quarter = half // 2
        y1, y2, x1, x2 = x.split(quarter, dim=-1)
        rotated = torch.cat((-y2, y1, -x2, x1), dim=-1)
        return x * cos + rotated * sin


@lru_cache(maxsize=64)
def _rope_tables(grid: Tuple[int, int], head_dim: int, freq: float,
                 device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if head_dim % 4:
        raise ValueError(f"RoPE2D needs a head dimension divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (freq ** (torch.arange(0, half, 2, device=device).float() / half))
    hp, wp = grid
    ys = torch.arange(hp, device=device, dtype=torch.float32).repeat_interleave(wp)
    xs = torch.arange(wp, device=device, dtype=torch.float32).repeat(hp)
    ang_y = ys[:, None] * inv_freq[None, :]          # (N, half/2), same fp32 products as a lookup table
    ang_x = xs[:, None] * inv_freq[None, :]
    angles = torch.cat((ang_y, ang_y, ang_x, ang_x), dim=-1)  # (N, head_dim)
    return angles.cos(), angles.sin()


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE on queries and keys."""

    def __init__(self, dim: int, num_heads: int, rope: RoPE2D):
        super().__init__()
        self.num_heads = num_heads
        self.rope = rope
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        cos, sin = self.rope.tables(grid, q.shape[-1], x.device, q.dtype)
        q, k = RoPE2D.apply(q, cos, sin), RoPE2D.apply(k, cos, sin)
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head cross-attention; queries use their own grid, keys the other image's grid."""

    def __init__(self, dim: int, num_heads: int, rope: RoPE2D):
        super().__init__()
        self.num_heads = num_heads
        self.rope = rope
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, grid_x: Tuple[int, int],
                grid_y: Tuple[int, int]) -> torch.Tensor:
        q = _split_heads(self.projq(x), self.num_heads)
        k = _split_heads(self.projk(y), self.num_heads)
        v = _split_heads(self.projv(y), self.num_heads)
        cos_q, sin_q = self.rope.tables(grid_x, q.shape[-1], x.device, q.dtype)
        cos_k, sin_k = self.rope.tables(grid_y, k.shape[-1], x.device, k.dtype)
        q, k = RoPE2D.apply(q, cos_q, sin_q), RoPE2D.apply(k, cos_k, sin_k)
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim or in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, rope: RoPE2D):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, rope)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), grid)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention, cross-attention to the other view (normed by norm_y), then MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, rope: RoPE2D, norm_y: bool = True):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, rope)
        self.cross_attn = CrossAttention(dim, num_heads, rope)
        self.norm2 = layer_norm(dim)
        self.norm3 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = layer_norm(dim) if norm_y else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor, grid_x: Tuple[int, int],
                grid_y: Tuple[int, int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), grid_x)
        x = x + self.cross_attn(self.norm2(x), self.norm_y(y), grid_x, grid_y)
        return x + self.mlp(self.norm3(x))
